r"""Runs the retrieval service, or, given shard addresses, the router of a sharded database.

    python -m retro_jax.serve --db=DB_DIR [--host=127.0.0.1] [--port=8765] \
        [--bert=PATH_OR_NAME] [--max_batch=256] [--max_k=100] [--max_body_bytes=16777216] \
        [--max_connections=512] [--idle_timeout=10] [--request_timeout=30] [--workers=4] \
        [--nowarm_up]
    python -m retro_jax.serve --db=DB --shard_addresses=ADDR.json [--allow_partial] \
        [--reload_interval=1] [--shard_timeout=30] [the flags above]

Loads the database, index, tokenizer and embedder once, then answers POST /retrieve,
POST /search, GET /health and GET /manifest until interrupted (retro_jax/retrieval/serve/:
server.py for the endpoints, limits and timeouts).  One such service per shard of a sharded
database, and this command with --shard_addresses (a JSON file {shard name: URL}) or
--shards=NAME=URL,... in front, serve it sharded (retro_jax/retrieval/serve/router.py).
The database is opened with the checks every consumer runs (manifests against chunks,
shapes, index file sizes), then a service recomputes the recorded sha256 of the chunk store
and index files it serves from (`integrity.check_contents`: rows reordered in place would
otherwise change every answer silently; --skip_content_check skips it); `python -m
retro_jax.verify DB_DIR` is the complete check.  Binds 127.0.0.1 unless told otherwise:
there is no authentication.
"""

from absl import flags
from absl import logging

from retro_jax import _cli
from retro_jax.retrieval.db import retriever as retriever_lib
from retro_jax.retrieval.db import sharded
from retro_jax.retrieval.embed import hashing as hashing_lib
from retro_jax.retrieval.serve import router as router_lib
from retro_jax.retrieval.serve import server as server_lib

_DEFAULTS = server_lib.ServiceConfig()
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
_WORKERS = flags.DEFINE_integer("workers", _DEFAULTS.workers,
                                "Threads that parse, validate and tokenise requests.",
                                lower_bound=1)
_SKIP_CONTENT_CHECK = flags.DEFINE_bool(
    "skip_content_check", False, "Do not recompute the recorded sha256 of the chunk store and "
    "index files at start (seconds per GB; for files `verify` has just checked).")
# The router: given shard addresses, --db is a sharded database served by one service per
# shard, and this process fans each query out to them.
_ADDRESSES = flags.DEFINE_string(
    "shard_addresses", None, "Run the router: JSON file mapping shard name to its service "
    'URL, e.g. {"shard-00000": "http://127.0.0.1:8801"}; re-read when it changes.')
_SHARDS = flags.DEFINE_string(
    "shards", None, "Run the router, the shard services given as NAME=URL,NAME=URL,... "
    "(instead of --shard_addresses).")
_PARTIAL = flags.DEFINE_bool(
    "allow_partial", False, "Router: answer from the shards that are up (marked \"partial\": "
    "true, \"missing_shards\") instead of failing with 503 when one is down.")
_RELOAD = flags.DEFINE_float(
    "reload_interval", 1.0, "Router: seconds between looks at DB/shards.json and the address "
    "file for edits (0 = never reload).", lower_bound=0.0)
_TIMEOUT = flags.DEFINE_float(
    "shard_timeout", 30.0, "Router: seconds a shard service may take to answer.",
    lower_bound=0.001)


def service_config() -> server_lib.ServiceConfig:
  """The service limits from the flags (the router takes the same ones)."""
  return server_lib.ServiceConfig(
      max_batch=_MAX_BATCH.value, max_k=_MAX_K.value, max_body_bytes=_MAX_BODY.value,
      max_buffered_bytes=_MAX_BODY.value + (4 << 20),
      max_connections=_MAX_CONN.value, idle_timeout=_IDLE.value,
      request_timeout=_REQUEST.value, workers=_WORKERS.value, warm_up=_WARM_UP.value)


def _router(embedder, config: server_lib.ServiceConfig) -> router_lib.RouterServer:
  file, table = _ADDRESSES.value, _SHARDS.value
  if file is not None and table is not None:
    raise router_lib.AddressError("give the shard services as --shard_addresses=FILE.json or "
                                  "--shards=NAME=URL,... (exactly one)")
  return router_lib.RouterServer(
      _DB.value, router_lib.parse_shards(table) if table is not None else None,
      address_file=file, allow_partial=_PARTIAL.value, reload_interval=_RELOAD.value,
      timeout=_TIMEOUT.value, embedder=embedder, host=_HOST.value, port=_PORT.value,
      config=config)


def main(argv):
  del argv
  config = service_config()
  embedder = hashing_lib.load_embedder(_BERT.value) if _BERT.value else None
  if _ADDRESSES.value is not None or _SHARDS.value is not None:
    server = _router(embedder, config)
    retriever = server.handler.retriever
    print(f"retrieval router on {server.url} ({retriever.store.num_chunks} chunks, "
          f"{len(retriever.db.index.shards)} shards)", flush=True)
  else:
    from retro_jax import integrity  # pylint: disable=g-import-not-at-top
    db = sharded.open_database(_DB.value)
    integrity.check_contents(db=db, db_parts=("chunks", "index"),
                             skip=_SKIP_CONTENT_CHECK.value, job="serve")
    retriever = retriever_lib.Retriever.open(db, embedder=embedder)
    server = server_lib.RetrievalServer(retriever, _HOST.value, _PORT.value, config=config)
    print(f"retrieval service on {server.url} ({retriever.store.num_chunks} chunks)",
          flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    logging.info("retrieval service stopped")


if __name__ == "__main__":
  _cli.run(main, "serve", errors=["retro_jax.retrieval.serve.client.RetrievalServiceError"])
