r"""Trains the LM's SentencePiece tokenizer on a corpus.

  python -m retro_jax.train_tokenizer \
      --corpus='/data/docs/**/*.txt' --output=/data/spm/retro --vocab_size=32000

writes /data/spm/retro.model and /data/spm/retro.vocab (pad=0, unk=1, bos=2, eos=3, byte
fallback; see retro_jax.retrieval.store.tokenizer).  `--corpus` takes what
`retro_jax.retrieval.store.corpus.iter_documents` takes (comma-separated paths, globs,
directories, .jsonl[.gz] files, a `datasets` directory).
"""

from absl import flags
from absl import logging

from retro_jax import _cli
from retro_jax.retrieval.store import corpus as corpus_lib
from retro_jax.retrieval.store import tokenizer as tokenizer_lib

_CORPUS = flags.DEFINE_list("corpus", None, "Corpus paths/globs/directories.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Output prefix (writes PREFIX.model/.vocab).",
                              required=True)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 32000, "Pieces in the vocabulary.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"],
                                "SentencePiece model type.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "JSON Lines key / datasets column.")
_SPLIT = flags.DEFINE_string("split", None, "The split of a datasets DatasetDict to read "
                             "(required when it has several).")
_INPUT_SENTENCE_SIZE = flags.DEFINE_integer(
    "input_sentence_size", 2_000_000, "Sample at most this many training sentences.")
_MAX_DOCUMENTS = flags.DEFINE_integer("max_documents", 0,
                                      "Read at most this many documents (0 = all).")
_NORMALIZATION = flags.DEFINE_string(
    "normalization", "identity", "SentencePiece normalization rule ('identity' keeps text "
    "byte-exact; 'nmt_nfkc' is SentencePiece's default).")
_VIA_FILE = flags.DEFINE_bool("via_file", False,
                              "Spool sentences to a temporary file instead of streaming.")


def main(argv):
  del argv
  corpus_lib.check_split(_CORPUS.value, _SPLIT.value)  # before reading anything
  docs = corpus_lib.iter_documents(_CORPUS.value, _TEXT_FIELD.value, split=_SPLIT.value)
  texts = corpus_lib.texts(docs)
  if _MAX_DOCUMENTS.value:
    texts = (t for _, t in zip(range(_MAX_DOCUMENTS.value), texts))
  path = tokenizer_lib.train_sentencepiece(
      texts, _OUTPUT.value, _VOCAB_SIZE.value, model_type=_MODEL_TYPE.value,
      input_sentence_size=_INPUT_SENTENCE_SIZE.value,
      normalization_rule_name=_NORMALIZATION.value, via_file=_VIA_FILE.value)
  logging.info("Wrote %s", path)
  print(path)


if __name__ == "__main__":
  _cli.run(main, "train_tokenizer")
