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
(`python -m retro_jax.chunk_store` is the same command.)  The settings:
retro_jax/retrieval/store/chunk_store_config.py.
"""

import os

from retro_jax import _cli
from retro_jax.retrieval.store import chunk_store_config

_CONFIG = _cli.define_flags(chunk_store_config.ChunkStoreConfig)


def main(argv):
  del argv
  config = _CONFIG()
  from retro_jax.retrieval.db import access  # pylint: disable=g-import-not-at-top  (after the malloc restart)
  from retro_jax.retrieval.store import chunk_store as chunk_store_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.store import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.store import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  if config.db:
    db = access.open_database(config.db)
    tokenizer, chunk_size = db.tokenizer, int(db.store.chunk_size)
    if config.chunk_size not in (None, chunk_size):
      raise ValueError(f"--chunk_size={config.chunk_size} but database {config.db} has "
                       f"chunk size {chunk_size}: drop --chunk_size")
  else:
    tokenizer = tokenizer_lib.load_tokenizer(config.tokenizer)
    chunk_size = config.chunk_size
  docs = corpus_lib.Corpus(config.source, text_field=config.text_field, split=config.split)
  out = os.path.abspath(config.output)
  if os.path.isdir(out) and os.listdir(out) and not os.path.exists(
      os.path.join(out, "manifest.json")):
    raise ValueError(f"--output={config.output} is a non-empty directory that holds no chunk "
                     "store: delete it or choose another --output")
  store = chunk_store_lib.build_chunk_store(docs, tokenizer, out, chunk_size, progress=True)
  print(f"wrote {config.output}: {store.num_chunks} chunks of {chunk_size} tokens from "
        f"{store.num_documents} documents")


if __name__ == "__main__":
  _cli.run(main, "chunk_store")
