"""Huge texts cannot take the service from a small query (issue #36, item 5).

A probe sent four 16 MB texts to a hashing-key service: all 4 workers embedded them at once
(+2 GB), and a 1-chunk query waited 14-23 s behind them.  Now the bytes of bodies in flight
are bounded by default at one largest body plus 4 MiB, so at most that many big texts are
handled at once (the rest get 503, retry later) and the other workers stay free; and the
hashing embedder reads a text word by word instead of building lists ~30x its size.
"""

import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest

from retro_jax.retrieval.db import retriever as retriever_lib
from retro_jax.retrieval.embed import hashing as hashing_lib
from retro_jax.retrieval.serve import server as server_lib
from test_build_db import make_db  # pylint: disable=g-bad-import-order

BIG = 1 << 20  # texts at least this long are the slow ones


def _reference_hashing(texts, dim):
  """The hashing embedder's definition, written plainly (lists of words and pairs)."""
  out = np.zeros((len(texts), dim), np.float32)
  for i, text in enumerate(texts):
    words = re.findall(r"\w+", text.lower())
    for feat in words + [a + " " + b for a, b in zip(words, words[1:])]:
      h = zlib.crc32(feat.encode("utf-8"))
      out[i, h % dim] += 1.0 if (h >> 31) & 1 else -1.0
  return out


def test_streamed_hashing_equals_its_definition():
  texts = ["Hello, World! héllo wörld foo_bar 12 x", "", "a", "A a a b",
           " ".join(["alpha", "beta", "gamma"] * 5000)]
  np.testing.assert_array_equal(hashing_lib.HashingEmbedder(64).embed_texts(texts),
                                _reference_hashing(texts, 64))


class _SlowOnBigTexts:
  """The hashing embedder, but a big text takes `delay` seconds (no CPU) and is counted, so
  the test measures admission, not this machine's speed."""

  def __init__(self, inner, delay):
    self.inner, self.delay = inner, delay
    self.lock = threading.Lock()
    self.now = self.most = 0

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def embed_texts(self, texts):
    big = any(len(t) >= BIG for t in texts)
    if big:
      with self.lock:
        self.now += 1
        self.most = max(self.most, self.now)
      time.sleep(self.delay)
      with self.lock:
        self.now -= 1
      texts = [t[:100] for t in texts]
    return self.inner.embed_texts(texts)


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
  return retriever_lib.Retriever.open(make_db(str(tmp_path_factory.mktemp("burst")),
                                              num_docs=10))


def test_big_texts_leave_workers_to_a_small_query(retriever):  # pylint: disable=redefined-outer-name
  slow = _SlowOnBigTexts(retriever.embedder, delay=8.0)
  r = retriever_lib.Retriever(retriever.db, slow)
  config = server_lib.ServiceConfig(max_body_bytes=3 << 20, workers=4)  # default budget
  server = server_lib.RetrievalServer(r, config=config).start()
  text = ("word " * (int(2.5 * (1 << 20)) // 5))
  body = json.dumps({"texts": [text], "k": 1}).encode()
  statuses, done = [], []

  def post(data):
    req = urllib.request.Request(server.url + "/retrieve", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(req, timeout=60) as resp:
        resp.read()
        return resp.status
    except urllib.error.HTTPError as e:
      return e.code
    except OSError:  # refused while still sending: the server answered 503 and closed
      return 503

  def big():
    status = post(body)
    statuses.append(status)
    if status == 200:
      done.append(time.monotonic())

  try:
    threads = [threading.Thread(target=big) for _ in range(4)]
    for t in threads:
      t.start()
    deadline = time.monotonic() + 60
    while slow.now < 1 and time.monotonic() < deadline:  # a big text is being embedded
      time.sleep(0.05)
    time.sleep(0.5)  # and the others have been answered 503 or admitted
    m = retriever.store.chunk_size
    start = time.monotonic()
    assert post(json.dumps({"chunks": [[5] * m], "k": 1}).encode()) == 200
    small_done = time.monotonic()
    for t in threads:
      t.join()
  finally:
    server.stop()
  budget = config.max_buffered_bytes
  assert budget == config.max_body_bytes + (4 << 20)
  assert 1 <= slow.most <= budget // len(body), (slow.most, budget, len(body))
  assert statuses.count(200) >= 1 and set(statuses) <= {200, 503}, statuses
  # The small query did not wait for a big text's worker: answered well inside the delay.
  assert small_done - start < slow.delay / 2, small_done - start
  assert small_done < min(done)  # before any admitted big text was answered


@pytest.mark.parametrize("bomb", [b"[" + b"0," * (8 << 20) + b"0]",
                                  b'{"chunks": ' + b"[" * (4 << 20) + b"]" * (4 << 20) + b"}",
                                  b'{"texts": ["' + b"a" * (8 << 20) + b'"], "k": ' +
                                  b"[0," * (2 << 20) + b"0" + b"]" * (2 << 20) + b"}"])
def test_a_json_bomb_costs_a_fraction_of_its_size(retriever, bomb):  # pylint: disable=redefined-outer-name
  import tracemalloc  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.serve import handler as handler_lib  # pylint: disable=g-import-not-at-top
  handler = handler_lib.RetrievalHandler(retriever)
  tracemalloc.start()
  try:
    before = tracemalloc.get_traced_memory()[0]
    with pytest.raises(handler_lib.BadRequest) as e:
      handler.parse_json(bomb)
    peak = tracemalloc.get_traced_memory()[1] - before
  finally:
    tracemalloc.stop()
  assert (e.value.status, "JSON values" in str(e.value)) == (413, True) or (
      e.value.status, str(e.value)) == (400, "malformed JSON: nested too deeply"), e.value
  assert peak < len(bomb) // 2 + (1 << 20), (peak, len(bomb))
  # A valid request still parses.
  m = retriever.store.chunk_size
  assert handler.parse(json.dumps({"chunks": [[1] * m] * 256, "k": 2}).encode()).n == 256


def test_no_absolute_corpus_path_leaves_the_service(retriever):  # pylint: disable=redefined-outer-name
  keys = retriever.store.doc_keys
  assert any(os.path.isabs(k) for k in keys)  # the fixture's corpus was read by path
  server = server_lib.RetrievalServer(retriever).start()
  try:
    with urllib.request.urlopen(server.url + "/manifest", timeout=30) as r:
      text = r.read().decode("utf-8")
    req = urllib.request.Request(
        server.url + "/retrieve", data=json.dumps(
            {"chunks": np.asarray(retriever.store.tokens[:4]).tolist(), "k": 3,
             "return_texts": True}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
      answer = json.loads(r.read())
  finally:
    server.stop()
  root = os.path.dirname(os.path.dirname(retriever.db.path))
  assert root not in text and root not in json.dumps(answer["doc_keys"])
  got = [k for row in answer["doc_keys"] for k in row if k is not None]
  # Still the documents' keys, relative to their corpus: each names one document.
  assert got and all(any(full.endswith(os.sep + k) for full in keys) for k in got), got


class _FakeBert:
  """Just enough of the BERT embedder for the server's warm-up: records the batch shapes
  it is asked to run (each a "compile" taking `delay` s)."""

  def __init__(self, identity, delay=0.2):
    self._identity, self.delay, self.shapes = identity, delay, set()
    self.buckets, self.batch_size = (8, 16), 64

  def identity(self):
    return self._identity

  def tokenize(self, texts):
    return [[1, 2] for _ in texts]

  def pad_lengths(self, ids):
    return np.full(len(ids), 8)

  def _row_bucket(self, n):
    return 1 << (int(n) - 1).bit_length()

  def embed_token_ids(self, ids, pad_lengths=None):
    shape = (self._row_bucket(len(ids)), int(np.max(pad_lengths)))
    if shape not in self.shapes:
      time.sleep(self.delay)
      self.shapes.add(shape)
    return np.zeros((len(ids), 32), np.float32)


def test_warm_up_covers_the_batch_shapes_or_health_says_so(retriever):  # pylint: disable=redefined-outer-name
  fake = _FakeBert(retriever.embedder.identity())
  r = retriever_lib.Retriever(retriever.db, fake)
  config = server_lib.ServiceConfig(warm_up=True, batch_rows=8)
  server = server_lib.RetrievalServer(r, config=config).start()
  try:
    def health():
      with urllib.request.urlopen(server.url + "/health", timeout=30) as resp:
        return json.loads(resp.read())
    first = health()
    deadline = time.monotonic() + 60
    while health()["status"] != "ok" and time.monotonic() < deadline:
      time.sleep(0.1)
  finally:
    server.stop()
  want = {(rows, length) for rows in (1, 2, 4, 8) for length in fake.buckets}
  assert want <= fake.shapes, sorted(want - fake.shapes)
  # Until then /health said so (the first look came right after the start).
  assert first["status"] == "warming up" and first["warm_up"]["of"] == 6, first
