r"""Sample text from a RETRO checkpoint, retrieving live every completed chunk.

  python -m retro_jax.generate --workdir=runs/small --db_dir=DB \
      --prompt="def main():" --prompt="import os" --max_new_tokens=128 \
      [--temperature=0.8 --top_k=50 --top_p=0.95 --seed=0 --num_neighbors=2]

Retrieval: --db_dir (in-process index) or --retrieval_url (a running
`python -m retro_jax.retrieval.serve`); --retrieval=off samples without neighbors.
--temperature=0 is greedy.  See retro_jax/generation/sampler.py.
"""

import sys

from absl import app
from absl import flags
from absl import logging

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (or checkpoints dir).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat for a batch).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "File with one prompt per line.")
_DB = flags.DEFINE_string("db_dir", None, "Database directory for live retrieval.")
_URL = flags.DEFINE_string("retrieval_url", None, "Retrieval service URL.")
_RETRIEVAL = flags.DEFINE_enum("retrieval", "on", ["on", "off"], "Retrieve every chunk.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "LM tokenizer file (default: the "
                                 "database's copy).")
_K = flags.DEFINE_integer("num_neighbors", None, "k per chunk (default: the model's).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to sample per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0 = greedy).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k filter (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus filter (1.0 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_NO_EOS_STOP = flags.DEFINE_bool("ignore_eos", False, "Do not stop at eos.")
_SHOW_NEIGHBORS = flags.DEFINE_bool("show_neighbors", False,
                                    "Also print the database chunk ids retrieved per chunk.")
_TIMEOUT = flags.DEFINE_float("service_timeout", 30.0, "Retrieval service timeout (s).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  prompts = list(_PROMPT.value or [])
  if _PROMPTS_FILE.value:
    with open(_PROMPTS_FILE.value, encoding="utf-8") as f:
      prompts += [line.rstrip("\n") for line in f if line.strip()]
  from retro_jax.evaluation import evaluate as eval_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.generation import sampler  # pylint: disable=g-import-not-at-top
  sampling = sampler.SamplingParams(
      max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
      top_p=_TOP_P.value, seed=_SEED.value, stop_at_eos=not _NO_EOS_STOP.value)
  try:
    outs = sampler.run_generation(
        _WORKDIR.value, prompts, db_dir=_DB.value, retrieval_url=_URL.value,
        retrieval=_RETRIEVAL.value == "on", tokenizer=_TOKENIZER.value,
        num_neighbors=_K.value, sampling=sampling, step=_STEP.value,
        service_timeout=_TIMEOUT.value)
  except eval_lib.USER_ERRORS as e:
    logging.error("%s: %s", type(e).__name__, e)
    sys.exit(f"error: {type(e).__name__}: {e}")
  for prompt, g in zip(prompts, outs):
    print(f"=== prompt: {prompt!r} ({len(g.prompt_tokens)} tokens; {len(g.tokens)} "
          f"generated, stopped by {g.stop_reason})")
    print(g.full_text)
    if _SHOW_NEIGHBORS.value:
      print(f"--- neighbors per chunk: {g.neighbor_ids.tolist()}")


if __name__ == "__main__":
  from retro_jax import host_malloc  # pylint: disable=g-import-not-at-top
  host_malloc.reexec_with_tuned_malloc()  # before JAX starts: see host_malloc
  app.run(main)
