r"""Build a chunk store only (no embeddings, no index): held-out or query text, cut into
chunks exactly as a database's own chunks are.

  retro-chunk-store --corpus=HELDOUT --db=DB --output=HELDOUT_CHUNKS [--split=test]
  retro-chunk-store --corpus=DOCS --tokenizer=TOK.model --chunk_size=32 --output=STORE

With --db the tokenizer and chunk size are the database's (its tokenizer copy and
manifest), so the store fits it; then
`retro-precompute-neighbors --db=DB --query_store=HELDOUT_CHUNKS --output=HELDOUT_NB --k=10
--exclude_same_document=false` gives its neighbors, and `retro-train
--config.data.eval_chunks_dir=HELDOUT_CHUNKS --config.data.eval_neighbors_dir=HELDOUT_NB`
evaluates on it during training (`retro-evaluate --eval_chunks=...` too).  The store is
written atomically and reused when rerun with the same inputs.
(`python -m retro_jax.chunk_store` is the same command.)
"""

import os

from absl import flags

from retro_jax import _cli

_CORPUS = flags.DEFINE_multi_string("corpus", None, "Corpus: file, directory, glob, "
                                    ".jsonl(.gz) or a saved datasets directory (repeatable).",
                                    required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Chunk store directory to write.",
                              required=True)
_DB = flags.DEFINE_string("db", None, "Take the tokenizer and chunk size from this database.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "LM tokenizer (without --db).")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", None, "m: tokens per chunk (without --db).",
                                   lower_bound=1)
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "JSON Lines / datasets text field.")
_SPLIT = flags.DEFINE_string("split", None, "The split of a datasets DatasetDict to read.")


def main(argv):
  del argv
  if bool(_DB.value) == bool(_TOKENIZER.value):
    raise ValueError("give --db=DB (its tokenizer and chunk size) or --tokenizer with "
                     "--chunk_size, not both")
  from retro_jax.retrieval.db import access  # pylint: disable=g-import-not-at-top  (after the malloc restart)
  from retro_jax.retrieval.store import chunk_store as chunk_store_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.store import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.store import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  if _DB.value:
    db = access.open_database(_DB.value)
    tokenizer, chunk_size = db.tokenizer, int(db.store.chunk_size)
    if _CHUNK_SIZE.value not in (None, chunk_size):
      raise ValueError(f"--chunk_size={_CHUNK_SIZE.value} but database {_DB.value} has "
                       f"chunk size {chunk_size}: drop --chunk_size")
  else:
    if _CHUNK_SIZE.value is None:
      raise ValueError("--tokenizer needs --chunk_size (or give --db=DB)")
    tokenizer, chunk_size = tokenizer_lib.load_tokenizer(_TOKENIZER.value), _CHUNK_SIZE.value
  source = _CORPUS.value[0] if len(_CORPUS.value) == 1 else list(_CORPUS.value)
  docs = corpus_lib.Corpus(source, text_field=_TEXT_FIELD.value, split=_SPLIT.value)
  out = os.path.abspath(_OUTPUT.value)
  if os.path.isdir(out) and os.listdir(out) and not os.path.exists(
      os.path.join(out, "manifest.json")):
    raise ValueError(f"--output={_OUTPUT.value} is a non-empty directory that holds no chunk "
                     "store: delete it or choose another --output")
  store = chunk_store_lib.build_chunk_store(docs, tokenizer, out, chunk_size, progress=True)
  print(f"wrote {_OUTPUT.value}: {store.num_chunks} chunks of {chunk_size} tokens from "
        f"{store.num_documents} documents")


if __name__ == "__main__":
  _cli.run(main, "chunk_store")
