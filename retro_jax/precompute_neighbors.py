r"""Precompute the neighbors of every chunk of a query store (training or evaluation split).

  python -m retro_jax.precompute_neighbors --db=DB_DIR --output=NEIGHBORS_DIR [--k=2] \
      [--query_store=CHUNK_STORE_DIR] [--exclude_same_document=auto|true|false] \
      [--extra_candidates=8] [--max_candidates=4096] [--part_size=8192] \
      [--num_shards=1 --shard_index=I] [--leaves_to_search=N] [--bert=EMBEDDER] \
      [--runner=DirectRunner|DataflowRunner|... --beam_options="..."]

Resumable and shardable over machines; see retro_jax/retrieval/jobs/precompute.py for the
output format and jobs/precompute_config.py for the settings.  With --runner it is an Apache Beam
pipeline writing sharded neighbor files (retro_jax/retrieval/jobs/beam.py).
"""

from retro_jax import _cli
from retro_jax.retrieval.jobs import precompute_config

_CONFIG = _cli.define_flags(precompute_config.PrecomputeConfig)


def main(argv):
  del argv
  config = _CONFIG()
  if config.runner is not None:
    from retro_jax.retrieval.jobs import beam as beam_lib  # pylint: disable=g-import-not-at-top  (Beam only when asked for)
    man = beam_lib.precompute_neighbors(config)
    print(f"wrote {config.output}: {man['num_queries']} x {man['k']} neighbors in "
          f"{len(man['shards'])} shards, {man['padded_entries']} padded entries")
    return
  from retro_jax.retrieval.jobs import precompute as precompute_lib  # pylint: disable=g-import-not-at-top  (after the malloc restart)
  man = precompute_lib.precompute(config)
  if man is None:
    print(f"shard {config.shard_index} of {config.num_shards} done; other parts still missing")
  else:
    print(f"wrote {config.output}: {man['num_queries']} x {man['k']} neighbors, "
          f"{man['padded_entries']} padded entries")


if __name__ == "__main__":
  _cli.run(main, "precompute_neighbors")
