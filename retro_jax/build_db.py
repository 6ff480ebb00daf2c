r"""Build a retrieval database: corpus -> chunk store -> embeddings -> ScaNN index.

  python -m retro_jax.build_db --corpus=PATH_OR_GLOB --tokenizer=TOK --output=DB_DIR \
      [--chunk_size=64] [--bert=PATH_OR_NAME] [--index_mode=auto|brute_force|tree_ah] \
      [--distance=dot_product] [--num_leaves=N] [--leaves_to_search=N] [--reorder=N] \
      [--embeddings_dtype=float32] [--embed_batch_size=128] [--shard_size=4096] \
      [--max_documents=N] [--recall_queries=1000] \
      [--runner=DirectRunner|DataflowRunner|FlinkRunner|SparkRunner|PortableRunner \
       --num_shards=S --beam_options="--direct_num_workers=2 ..."]

Every step resumes; see retro_jax/retrieval/jobs/build.py for the steps and
jobs/build_config.py for the settings.  With
--runner the build is an Apache Beam pipeline writing a sharded database
(retro_jax/retrieval/jobs/beam.py).
"""

from retro_jax import _cli
from retro_jax.retrieval.jobs import build_config

_CONFIG = _cli.define_flags(build_config.BuildConfig)


def main(argv):
  del argv
  config = _CONFIG()
  if config.runner is not None:
    from retro_jax.retrieval.jobs import beam as beam_lib  # pylint: disable=g-import-not-at-top  (Beam only when asked for)
    man = beam_lib.build_database(config)
    print(f"wrote {config.output}: {man['num_chunks']} chunks of {man['chunk_size']} tokens "
          f"in {len(man['shards'])} shards, index {man['index']['settings']['mode']}")
    return
  from retro_jax.retrieval.jobs import build as build_lib  # pylint: disable=g-import-not-at-top  (after the malloc restart)
  man = build_lib.build(config)
  recall = {k: v for k, v in (man["index"].get("recall") or {}).items() if "@" in k}
  print(f"wrote {config.output}: {man['num_chunks']} chunks of {man['chunk_size']} tokens, "
        f"index {man['index']['settings']['mode']}, recall {recall}")


if __name__ == "__main__":
  _cli.run(main, "build_db")
