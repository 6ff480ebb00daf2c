"""Malformed requests against the retrieval service: each one a 4xx JSON error, never a
500 or a hang, and the server answers /health after every one (issue 23)."""

import json
import socket

import pytest

from retro_jax.retrieval.db import retriever as retriever_lib
from retro_jax.retrieval.serve import server as server_lib
from test_build_db import make_db  # pylint: disable=g-bad-import-order

LIMIT = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  retriever = retriever_lib.Retriever.open(make_db(str(tmp_path_factory.mktemp("fuzz")),
                                                   num_docs=6))
  config = server_lib.ServiceConfig(max_batch=8, max_k=5, max_body_bytes=LIMIT,
                                     idle_timeout=1.0, request_timeout=1.0)
  srv = server_lib.RetrievalServer(retriever, config=config).start()
  yield srv
  srv.stop()


def exchange(url: str, data: bytes, timeout: float = 10.0) -> tuple[int, dict, bytes]:
  """Sends raw bytes; returns (status, headers, body) of the answer (read until its length)."""
  host, port = url.replace("http://", "").split(":")
  with socket.create_connection((host, int(port)), timeout=timeout) as s:
    try:
      s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
      pass  # The server answered and closed before taking it all (413): read the answer.
    raw = b""
    while b"\r\n\r\n" not in raw:
      chunk = s.recv(65536)
      if not chunk:
        raise AssertionError(f"connection closed without an answer to {data[:120]!r}")
      raw += chunk
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:])}
    want = int(headers.get("content-length", 0))
    if not data.startswith(b"HEAD "):
      while len(body) < want:
        chunk = s.recv(65536)
        if not chunk:
          break
        body += chunk
    return status, headers, body


def post(path: str, body: bytes, headers: str = "") -> bytes:
  return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
          f"Content-Length: {len(body)}\r\n{headers}\r\n").encode() + body


def retrieve(obj) -> bytes:
  return post("/retrieve", obj if isinstance(obj, bytes) else json.dumps(obj).encode())


def malformed_requests(m: int, vocab: int, docs: int) -> list[tuple[str, bytes]]:
  chunk = [1] * m
  cases = []
  for method in ("PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE"):
    for path in ("/retrieve", "/health", "/manifest"):
      cases.append((f"{method} {path}", f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
                    "Content-Length: 0\r\n\r\n".encode()))
  cases += [
      ("GET /retrieve", b"GET /retrieve HTTP/1.1\r\nHost: x\r\n\r\n"),
      ("POST /health", post("/health", b"{}")),
      ("POST /manifest", post("/manifest", b"{}")),
      ("unknown path", post("/nowhere", b"{}")),
      ("GET unknown", b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n"),
      ("OPTIONS *", b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n"),
      ("garbage request line", b"GARBAGE\r\n\r\n"),
      ("binary request line", b"\x00\xff\xfe\x01 / HTTP/1.1\r\n\r\n"),
      ("HTTP/9", b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n"),
      ("header without colon", b"GET /health HTTP/1.1\r\nHost x\r\n\r\n"),
      ("no Host (HTTP/1.1)", b"GET /health HTTP/1.1\r\n\r\n"),
      ("headers too large", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000
       + b"\r\n\r\n"),
      ("bad Content-Length", b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: abc"
       b"\r\n\r\n"),
      ("negative Content-Length", b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: -1"
       b"\r\n\r\n"),
      ("two Content-Lengths", b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
       b"Content-Length: 3\r\n\r\n{}"),
      ("unknown Transfer-Encoding", b"POST /retrieve HTTP/1.1\r\nHost: x\r\n"
       b"Transfer-Encoding: gzip\r\n\r\n"),
      ("bad chunk size", b"POST /retrieve HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
       b"\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"),
      ("no Content-Length", b"POST /retrieve HTTP/1.1\r\nHost: x\r\n\r\n"),
      ("declared body over the limit", b"POST /retrieve HTTP/1.1\r\nHost: x\r\n"
       + f"Content-Length: {LIMIT + 1}\r\n\r\n".encode() + b"x" * 1000),
      ("body of 16 MiB declared", b"POST /retrieve HTTP/1.1\r\nHost: x\r\n"
       + f"Content-Length: {16 << 20}\r\n\r\n".encode()),
      ("chunked body over the limit", b"POST /retrieve HTTP/1.1\r\nHost: x\r\n"
       b"Transfer-Encoding: chunked\r\n\r\n" + (b"8000\r\n" + b" " * 0x8000 + b"\r\n") * 40
       + b"0\r\n\r\n"),
      ("partial body", b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
       b'{"texts": '),
      ("empty body", post("/retrieve", b"")),
      ("not UTF-8", retrieve(b'{"texts": ["\xff\xfe"], "k": 1}')),
      ("UTF-16", retrieve(json.dumps({"texts": ["a"], "k": 1}).encode("utf-16"))),
      ("truncated JSON", retrieve(b'{"texts": ["a"], "k": ')),
      ("trailing garbage", retrieve(b'{"texts": ["a"], "k": 1} x')),
      ("single quotes", retrieve(b"{'texts': ['a'], 'k': 1}")),
      ("nesting 100k deep", retrieve(b"[" * 100000 + b"]" * 100000)),
      ("object nesting 20k deep", retrieve(b'{"a":' * 20000 + b"1" + b"}" * 20000)),
      ("texts nested deep", retrieve(b'{"k": 1, "texts": ' + b"[" * 50000 + b"]" * 50000
                                     + b"}")),
      ("integer of 5000 digits", retrieve(b'{"texts": ["a"], "k": ' + b"9" * 5000 + b"}")),
      ("lone surrogate", retrieve(b'{"texts": ["abc \\ud800 def"], "k": 1}')),
      ("lone low surrogate", retrieve(b'{"texts": ["\\udfff"], "k": 1}')),
      ("surrogate in a later text", retrieve(b'{"texts": ["ok", "x\\ud83d"], "k": 1}')),
      ("NaN k", retrieve(b'{"texts": ["a"], "k": NaN}')),
      ("Infinity k", retrieve(b'{"texts": ["a"], "k": Infinity}')),
  ]
  bodies = [
      [], 1, "texts", None, True, [{"texts": ["a"], "k": 1}],
      {}, {"k": 1}, {"texts": ["a"]}, {"texts": ["a"], "chunks": [chunk], "k": 1},
      {"texts": ["a"], "k": 1, "colour": "red"}, {"texts": ["a"], "k": 1, "": 0},
      {"texts": ["a"], "k": 0}, {"texts": ["a"], "k": -3}, {"texts": ["a"], "k": 1.5},
      {"texts": ["a"], "k": 2.0}, {"texts": ["a"], "k": "2"}, {"texts": ["a"], "k": True},
      {"texts": ["a"], "k": None}, {"texts": ["a"], "k": [1]}, {"texts": ["a"], "k": 6},
      {"texts": ["a"], "k": 2 ** 63}, {"texts": ["a"], "k": 2 ** 64 + 1},
      {"texts": ["a"], "k": 10 ** 100},
      {"texts": "a", "k": 1}, {"texts": {"a": 1}, "k": 1}, {"texts": [1], "k": 1},
      {"texts": [None], "k": 1}, {"texts": [["a"]], "k": 1}, {"texts": ["a"] * 9, "k": 1},
      {"texts": ["a"], "k": 1, "exclude_doc_ids": [0]},
      {"texts": ["a"], "k": 1, "return_texts": "yes"},
      {"texts": ["a"], "k": 1, "return_tokens": 1},
      {"chunks": chunk, "k": 1}, {"chunks": [chunk[:-1]], "k": 1},
      {"chunks": [chunk + [1]], "k": 1}, {"chunks": [[]], "k": 1}, {"chunks": [None], "k": 1},
      {"chunks": ["abc"], "k": 1}, {"chunks": [[1.5] * m], "k": 1},
      {"chunks": [[True] * m], "k": 1}, {"chunks": [["1"] * m], "k": 1},
      {"chunks": [[[1]] * m], "k": 1}, {"chunks": [[None] * m], "k": 1},
      {"chunks": [[-2] + chunk[1:]], "k": 1}, {"chunks": [[vocab] + chunk[1:]], "k": 1},
      {"chunks": [[2 ** 63] + chunk[1:]], "k": 1},
      {"chunks": [[2 ** 64] + chunk[1:]], "k": 1},
      {"chunks": [[-2 ** 63 - 1] + chunk[1:]], "k": 1},
      {"chunks": [[10 ** 30] * m], "k": 1}, {"chunks": [chunk] * 9, "k": 1},
      {"chunks": {"0": chunk}, "k": 1}, {"chunks": "chunk", "k": 1},
      {"chunks": [chunk], "k": 1, "exclude_doc_ids": 0},
      {"chunks": [chunk], "k": 1, "exclude_doc_ids": [0, 1]},
      {"chunks": [chunk], "k": 1, "exclude_doc_ids": []},
      {"chunks": [chunk], "k": 1, "exclude_doc_ids": [docs]},
      {"chunks": [chunk], "k": 1, "exclude_doc_ids": [-2]},
      {"chunks": [chunk], "k": 1, "exclude_doc_ids": [2 ** 63]},
      {"chunks": [chunk], "k": 1, "exclude_doc_ids": [2 ** 64]},
      {"chunks": [chunk], "k": 1, "exclude_doc_ids": [-2 ** 63 - 1]},
      {"chunks": [chunk], "k": 1, "exclude_doc_ids": [1.0]},
      {"chunks": [chunk], "k": 1, "exclude_doc_ids": [None]},
      {"chunks": [chunk], "k": 1, "exclude_doc_ids": [True]},
      {"chunks": [chunk], "k": 1, "exclude_doc_ids": ["0"]},
  ]
  cases += [(f"body {json.dumps(b)[:60]}", retrieve(b)) for b in bodies]
  return cases


def test_every_malformed_request_is_a_4xx_json_error(server):
  r = server.handler.retriever
  cases = malformed_requests(r.chunk_size, r.tokenizer.vocab_size, r.store.num_documents)
  assert len(cases) >= 100
  health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
  for name, data in cases:
    status, headers, body = exchange(server.url, data)
    assert 400 <= status < 500, (name, status, body[:300])
    assert headers.get("content-type") == "application/json", (name, headers)
    if not data.startswith(b"HEAD "):
      error = json.loads(body.decode("utf-8"))["error"]
      assert isinstance(error, str) and error, name
    status, _, body = exchange(server.url, health)
    assert status == 200 and json.loads(body)["status"] == "ok", name


def test_methods_get_405_with_allow(server):
  for method, path, allow in (("PUT", "/retrieve", "POST"), ("DELETE", "/health", "GET"),
                              ("OPTIONS", "/manifest", "GET"), ("HEAD", "/health", "GET")):
    status, headers, body = exchange(server.url, f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
                                     "\r\n".encode())
    assert status == 405 and headers["allow"] == allow, (method, path, status)
    if method != "HEAD":
      assert f"use {allow}" in json.loads(body)["error"]


def test_specific_messages(server):
  m = server.handler.retriever.chunk_size

  def error(obj) -> tuple[int, str]:
    status, _, body = exchange(server.url, retrieve(obj))
    return status, json.loads(body)["error"]

  assert error(b"[" * 100000 + b"]" * 100000) == (400, "malformed JSON: nested too deeply")
  status, message = error(b'{"texts": ["abc \\ud800"], "k": 1}')
  assert status == 400 and "texts[0] is not valid Unicode" in message
  status, message = error({"chunks": [[2 ** 64] * m], "k": 1})
  assert status == 400 and "token ids must lie in [-1," in message
  status, message = error({"chunks": [[1] * m], "k": 1, "exclude_doc_ids": [2 ** 64]})
  assert status == 400 and "'exclude_doc_ids' must lie in [-1, 6)" in message
  status, _, body = exchange(server.url, b"POST /retrieve HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: 10\r\n\r\n{")
  assert status == 408 and "not received within 1 s" in json.loads(body)["error"]
