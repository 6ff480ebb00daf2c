r"""Runs the retrieval service (see service.py for the endpoints).

    python -m retro_jax.retrieval.serve --db=DB_DIR [--host=127.0.0.1] [--port=8765] \
        [--bert=PATH_OR_NAME] [--max_batch=256] [--max_k=100]

Loads the database, index, tokenizer and embedder once, then answers POST /retrieve,
GET /health and GET /manifest until interrupted.  Binds 127.0.0.1 unless told otherwise:
there is no authentication.
"""

from absl import app
from absl import flags
from absl import logging

from retro_jax.retrieval import retriever as retriever_lib
from retro_jax.retrieval import service as service_lib

_DB = flags.DEFINE_string("db", None, "Database directory (build_db output).", required=True)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind.")
_PORT = flags.DEFINE_integer("port", 8765, "Port (0 = any free port).")
_BERT = flags.DEFINE_string("bert", None, "Embedder override (default: the one recorded in "
                            "the database manifest; must have the index's identity).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 256, "Most queries per request.")
_MAX_K = flags.DEFINE_integer("max_k", 100, "Largest k a request may ask for.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    embedder = retriever_lib.load_embedder(_BERT.value) if _BERT.value else None
    retriever = retriever_lib.Retriever.open(_DB.value, embedder=embedder)
    server = service_lib.RetrievalServer(retriever, _HOST.value, _PORT.value,
                                         _MAX_BATCH.value, _MAX_K.value)
  except (ValueError, OSError) as e:
    raise SystemExit(f"serve: error: {e}") from None
  print(f"retrieval service on {server.url} ({retriever.store.num_chunks} chunks)", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    logging.info("retrieval service stopped")


if __name__ == "__main__":
  app.run(main)
