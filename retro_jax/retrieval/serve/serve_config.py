"""The configuration of `python -m retro_jax.serve`: the service of one database, or, given
shard addresses, the router of a sharded one.

Every default once; the command's flags are derived from these fields (retro_jax/_cli.py).
The service limits default to `ServiceConfig`'s (server.py).  Pure Python (no JAX).
"""

from __future__ import annotations

import dataclasses

from retro_jax.options import ConfigError
from retro_jax.options import option
from retro_jax.retrieval.serve import server as server_lib

_LIMITS = server_lib.ServiceConfig()


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  """What `serve` serves, where, and with which limits."""
  db: str = option(None, "Database directory (build_db output).", required=True)
  host: str = option("127.0.0.1", "Address to bind.")
  port: int = option(8765, "Port (0 = any free port).")
  bert: str | None = option(None, "Embedder override (default: the one recorded in the "
                            "database manifest; must have the index's identity).")
  max_batch: int = option(_LIMITS.max_batch, "Most queries per request.")
  max_k: int = option(_LIMITS.max_k, "Largest k a request may ask for.")
  max_body_bytes: int = option(_LIMITS.max_body_bytes, "Largest request body (413 beyond).")
  max_connections: int = option(_LIMITS.max_connections,
                                "Open connections at once (503 beyond).")
  idle_timeout: float = option(_LIMITS.idle_timeout, "Seconds a connection may wait to send "
                               "a request's headers.")
  request_timeout: float = option(_LIMITS.request_timeout,
                                  "Seconds for a request's body to arrive.")
  skip_content_check: bool = option(False, "Do not recompute the recorded sha256 of the "
                                    "chunk store and index files at start (seconds per GB; "
                                    "for files `verify` has just checked).")
  warm_up: bool = option(True, "Compile BERT for one row at every bucket length before "
                         "serving (no effect with a hashing embedder).")
  workers: int = option(_LIMITS.workers, "Threads that parse, validate and tokenise requests.")
  log_requests: str = option(_LIMITS.log_requests, "Log one line per request (method, path, "
                             "status, time) at this level, or off.",
                             choices=sorted(server_lib.REQUEST_LOG_LEVELS))
  # The router: given shard addresses, `db` is a sharded database served by one service per
  # shard, and this process fans each query out to them (router.py).
  shard_addresses: str | None = option(
      None, "Run the router: JSON file mapping shard name to its service URL, e.g. "
      '{"shard-00000": "http://127.0.0.1:8801"}; re-read when it changes.')
  shards: str | None = option(None, "Run the router, the shard services given as "
                              "NAME=URL,NAME=URL,... (instead of --shard_addresses).")
  allow_partial: bool = option(False, "Router: answer from the shards that are up (marked "
                               "\"partial\": true, \"missing_shards\") instead of failing "
                               "with 503 when one is down.")
  reload_interval: float = option(1.0, "Router: seconds between looks at DB/shards.json and "
                                  "the address file for edits (0 = never reload).")
  shard_timeout: float = option(30.0, "Router: seconds a shard service may take to answer.")

  def __post_init__(self):
    if not 0 <= self.port <= 65535:
      raise ConfigError(f"--port must be in 0..65535, got {self.port}")
    for name in ("max_batch", "max_k", "max_body_bytes", "max_connections", "workers"):
      if getattr(self, name) < 1:
        raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
    for name in ("idle_timeout", "request_timeout", "shard_timeout"):
      if not getattr(self, name) > 0:
        raise ConfigError(f"--{name} must be > 0 seconds, got {getattr(self, name)}")
    if self.reload_interval < 0:
      raise ConfigError(f"--reload_interval must be >= 0 seconds (0 = never), got "
                        f"{self.reload_interval}")
    if self.shard_addresses is not None and self.shards is not None:
      raise ConfigError("give the shard services as --shard_addresses=FILE.json or "
                        "--shards=NAME=URL,... (exactly one)")

  @property
  def is_router(self) -> bool:
    return self.shard_addresses is not None or self.shards is not None

  def service(self) -> server_lib.ServiceConfig:
    """The server's limits (the buffered-bytes budget grows with the body limit)."""
    return server_lib.ServiceConfig(
        max_batch=self.max_batch, max_k=self.max_k, max_body_bytes=self.max_body_bytes,
        max_buffered_bytes=self.max_body_bytes + (4 << 20),  # one largest body + small ones
        max_connections=self.max_connections, idle_timeout=self.idle_timeout,
        request_timeout=self.request_timeout, workers=self.workers, warm_up=self.warm_up,
        log_requests=self.log_requests)
