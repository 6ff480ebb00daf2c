r"""Sample text from a RETRO checkpoint, retrieving live every completed chunk.

  python -m retro_jax.generate --workdir=runs/small --db=DB \
      --prompt="def main():" --prompt="import os" --max_new_tokens=128 \
      [--temperature=0.8 --top_k=50 --top_p=0.95 --seed=0 --num_neighbors=2]

Retrieval: --db (in-process index; --db_dir is the same flag) or --retrieval_url (a
running `python -m retro_jax.serve`); --retrieval=off samples without neighbors.
--temperature=0 is greedy.  See retro_jax/generation/sampler.py and generate_config.py.
"""

from retro_jax import _cli
from retro_jax.generation import generate_config

_CONFIG = _cli.define_flags(generate_config.GenerateConfig, aliases={"db_dir": "db"})


def main(argv):
  del argv
  config = _CONFIG()
  from retro_jax.generation import sampler  # pylint: disable=g-import-not-at-top  (after the malloc restart)
  outs = sampler.generate(config)
  for prompt, g in zip(config.prompts(), outs):
    print(f"=== prompt: {prompt!r} ({len(g.prompt_tokens)} tokens; {len(g.tokens)} "
          f"generated, stopped by {g.stop_reason})")
    print(g.full_text)
    if config.show_neighbors:
      print(f"--- neighbors per chunk: {g.neighbor_ids.tolist()}")


if __name__ == "__main__":
  _cli.run(main, "generate", errors=["retro_jax.retrieval.serve.client.RetrievalServiceError"])
