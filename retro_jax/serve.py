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

from absl import logging

from retro_jax import _cli
from retro_jax.retrieval.db import access
from retro_jax.retrieval.db import retriever as retriever_lib
from retro_jax.retrieval.embed import hashing as hashing_lib
from retro_jax.retrieval.serve import router as router_lib
from retro_jax.retrieval.serve import server as server_lib
from retro_jax.retrieval.serve.serve_config import ServeConfig

_CONFIG = _cli.define_flags(ServeConfig)


def start(config: ServeConfig) -> server_lib.RetrievalServer:
  """The server `config` describes: the service of its database, or the router."""
  embedder = hashing_lib.load_embedder(config.bert) if config.bert else None
  if config.is_router:
    return router_lib.RouterServer(
        config.db,
        router_lib.parse_shards(config.shards) if config.shards is not None else None,
        address_file=config.shard_addresses, allow_partial=config.allow_partial,
        reload_interval=config.reload_interval, timeout=config.shard_timeout,
        embedder=embedder, host=config.host, port=config.port, config=config.service())
  db = access.open_database(config.db)
  from retro_jax import integrity  # pylint: disable=g-import-not-at-top
  integrity.check_contents(db=db, db_parts=("chunks", "index"),
                           skip=config.skip_content_check, job="serve")
  retriever = retriever_lib.Retriever.open(db, embedder=embedder)
  return server_lib.RetrievalServer(retriever, config.host, config.port,
                                    config=config.service())


def main(argv):
  del argv
  config = _CONFIG()
  server = start(config)
  retriever = server.handler.retriever
  if config.is_router:
    print(f"retrieval router on {server.url} ({retriever.store.num_chunks} chunks, "
          f"{len(retriever.db.index.shards)} shards)", flush=True)
  else:
    print(f"retrieval service on {server.url} ({retriever.store.num_chunks} chunks)",
          flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    logging.info("retrieval service stopped")


if __name__ == "__main__":
  _cli.run(main, "serve", errors=["retro_jax.retrieval.serve.client.RetrievalServiceError"])
