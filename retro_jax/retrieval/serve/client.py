"""`RemoteRetriever`, the client of the retrieval service, and the errors a caller sees."""

from __future__ import annotations

import json
import socket
from typing import Any, Sequence
import urllib.error
import urllib.request

import numpy as np

from retro_jax.retrieval.db import retriever as retriever_lib


class RetrievalServiceError(RuntimeError):
  """The service answered with an error; `status` is the HTTP status."""

  def __init__(self, status: int, message: str):
    super().__init__(f"retrieval service error {status}: {message}")
    self.status = status
    self.message = message


class ServiceUnavailableError(ConnectionError):
  """The service could not be reached (refused, timed out, DNS)."""


class ServiceUnavailableAnswer(RetrievalServiceError, ServiceUnavailableError):
  """The service answered 503: overloaded, or (a router) a shard it needs is down."""


class RemoteRetriever:
  """Client for `RetrievalServer` with the Retriever's query methods."""

  def __init__(self, url: str, timeout: float = 30.0):
    self.url = url.rstrip("/")
    self.timeout = timeout
    self._manifest = None

  def _request(self, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode("utf-8")
    req = urllib.request.Request(self.url + path, data=data, method="GET" if data is None
                                 else "POST", headers={"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(req, timeout=self.timeout) as resp:
        return json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
      try:
        message = json.loads(e.read().decode("utf-8")).get("error", "")
      except Exception:  # pylint: disable=broad-except
        message = e.reason
      if e.code == 503:
        raise ServiceUnavailableAnswer(e.code, message) from None
      raise RetrievalServiceError(e.code, message) from None
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
      reason = getattr(e, "reason", e)
      raise ServiceUnavailableError(
          f"retrieval service at {self.url} is not reachable ({reason}); start it with "
          "`python -m retro_jax.serve --db=DB_DIR`") from None

  def health(self) -> dict:
    return self._request("/health")

  @property
  def manifest(self) -> dict:
    if self._manifest is None:
      self._manifest = self._request("/manifest")
    return self._manifest

  @property
  def chunk_size(self) -> int:
    return int(self.manifest["chunk_size"])

  @staticmethod
  def _result(answer: dict, k: int, m: int) -> retriever_lib.RetrievalResult:
    ids = np.asarray(answer["ids"], dtype=np.int64).reshape(-1, k)
    dist = np.asarray([[np.inf if v is None else v for v in row]
                       for row in answer["distances"]], dtype=np.float32).reshape(-1, k)
    tokens = np.asarray(answer.get("tokens", np.full(ids.shape + (2 * m,), -1)),
                        dtype=np.int32).reshape(ids.shape + (2 * m,))
    result = retriever_lib.RetrievalResult(ids, dist, tokens)
    if answer.get("partial"):  # A router answered without the shards that are down.
      result.missing_shards = list(answer.get("missing_shards") or [])
    return result

  def retrieve_chunks(self, tokens, k: int, exclude_doc_ids=None
                      ) -> retriever_lib.RetrievalResult:
    body = {"chunks": np.asarray(tokens).tolist(), "k": k}
    if exclude_doc_ids is not None:
      body["exclude_doc_ids"] = np.asarray(exclude_doc_ids).tolist()
    return self._result(self._request("/retrieve", body), k, self.chunk_size)

  def retrieve_texts(self, texts: Sequence[str], k: int) -> retriever_lib.RetrievalResult:
    return self._result(self._request("/retrieve", {"texts": list(texts), "k": k}), k,
                        self.chunk_size)
