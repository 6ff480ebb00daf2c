r"""Runs the retrieval service (see service.py for the endpoints, limits and timeouts).

    python -m retro_jax.retrieval.serve --db=DB_DIR [--host=127.0.0.1] [--port=8765] \
        [--bert=PATH_OR_NAME] [--max_batch=256] [--max_k=100] [--max_body_bytes=16777216] \
        [--max_connections=512] [--idle_timeout=10] [--request_timeout=30] [--workers=4] \
        [--nowarm_up]

Loads the database, index, tokenizer and embedder once, then answers POST /retrieve,
POST /search, GET /health and GET /manifest until interrupted.  One such service per shard
of a sharded database, and `python -m retro_jax.retrieval.router` in front, serve it
sharded (router.py).  The database is opened with the checks every consumer runs
(manifests against chunks, shapes, index file sizes), then the recorded sha256 of the chunk
store and index files it serves from is recomputed (`integrity.check_contents`: rows
reordered in place would otherwise change every answer silently; --skip_content_check skips
it); `python -m retro_jax.verify DB_DIR` is the complete check.  Binds 127.0.0.1 unless
told otherwise: there is no authentication.
"""

from absl import flags
from absl import logging

from retro_jax import _cli
from retro_jax.retrieval import retriever as retriever_lib
from retro_jax.retrieval import service as service_lib
from retro_jax.retrieval import sharded

_DEFAULTS = service_lib.ServiceConfig()
_DB = flags.DEFINE_string("db", None, "Database directory (build_db output).", required=True)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind.")
_PORT = flags.DEFINE_integer("port", 8765, "Port (0 = any free port).", lower_bound=0,
                             upper_bound=65535)
_BERT = flags.DEFINE_string("bert", None, "Embedder override (default: the one recorded in "
                            "the database manifest; must have the index's identity).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", _DEFAULTS.max_batch,
                                  "Most queries per request.", lower_bound=1)
_MAX_K = flags.DEFINE_integer("max_k", _DEFAULTS.max_k, "Largest k a request may ask for.",
                              lower_bound=1)
_MAX_BODY = flags.DEFINE_integer("max_body_bytes", _DEFAULTS.max_body_bytes,
                                 "Largest request body (413 beyond).", lower_bound=1)
_MAX_CONN = flags.DEFINE_integer("max_connections", _DEFAULTS.max_connections,
                                 "Open connections at once (503 beyond).", lower_bound=1)
_IDLE = flags.DEFINE_float("idle_timeout", _DEFAULTS.idle_timeout,
                           "Seconds a connection may wait to send a request's headers.",
                           lower_bound=0.001)
_REQUEST = flags.DEFINE_float("request_timeout", _DEFAULTS.request_timeout,
                              "Seconds for a request's body to arrive.", lower_bound=0.001)
_WARM_UP = flags.DEFINE_bool("warm_up", True, "Compile BERT for one row at every bucket "
                             "length before serving (no effect with a hashing embedder).")
_SKIP_CONTENT_CHECK = flags.DEFINE_bool(
    "skip_content_check", False, "Do not recompute the recorded sha256 of the chunk store and "
    "index files at start (seconds per GB; for files `verify` has just checked).")
_WORKERS = flags.DEFINE_integer("workers", _DEFAULTS.workers,
                                "Threads that parse, validate and tokenise requests.",
                                lower_bound=1)


def service_config() -> service_lib.ServiceConfig:
  """The service limits from the flags (the router takes the same ones)."""
  return service_lib.ServiceConfig(
      max_batch=_MAX_BATCH.value, max_k=_MAX_K.value, max_body_bytes=_MAX_BODY.value,
      max_buffered_bytes=max(_DEFAULTS.max_buffered_bytes, 4 * _MAX_BODY.value),
      max_connections=_MAX_CONN.value, idle_timeout=_IDLE.value,
      request_timeout=_REQUEST.value, workers=_WORKERS.value, warm_up=_WARM_UP.value)


def main(argv):
  del argv
  config = service_config()
  embedder = retriever_lib.load_embedder(_BERT.value) if _BERT.value else None
  from retro_jax import integrity  # pylint: disable=g-import-not-at-top
  db = sharded.open_database(_DB.value)
  integrity.check_contents(db=db, db_parts=("chunks", "index"),
                           skip=_SKIP_CONTENT_CHECK.value, job="serve")
  retriever = retriever_lib.Retriever.open(db, embedder=embedder)
  server = service_lib.RetrievalServer(retriever, _HOST.value, _PORT.value, config=config)
  print(f"retrieval service on {server.url} ({retriever.store.num_chunks} chunks)", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    logging.info("retrieval service stopped")


if __name__ == "__main__":
  _cli.run(main, "serve")
