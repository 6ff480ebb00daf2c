r"""Trains the LM's SentencePiece tokenizer on a corpus.

  python -m retro_jax.train_tokenizer \
      --corpus='/data/docs/**/*.txt' --output=/data/spm/retro --vocab_size=32000

writes /data/spm/retro.model and /data/spm/retro.vocab (pad=0, unk=1, bos=2, eos=3, byte
fallback; see retro_jax.retrieval.store.tokenizer).  `--corpus` takes what
`retro_jax.retrieval.store.corpus.iter_documents` takes (comma-separated paths, globs,
directories, .jsonl[.gz] files, a `datasets` directory).  The settings:
retro_jax/retrieval/store/tokenizer_config.py.
"""

from absl import logging

from retro_jax import _cli
from retro_jax.retrieval.store import tokenizer_config

_CONFIG = _cli.define_flags(tokenizer_config.TokenizerConfig)


def main(argv):
  del argv
  config = _CONFIG()
  from retro_jax.retrieval.store import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top  (after the malloc restart)
  path = tokenizer_lib.train(config)
  logging.info("Wrote %s", path)
  print(path)


if __name__ == "__main__":
  _cli.run(main, "train_tokenizer")
