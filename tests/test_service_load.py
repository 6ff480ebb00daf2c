"""The retrieval service under concurrency: shared batches give each request the answer it
gets alone, long texts are cut exactly, and idle or stalled connections are closed."""

import concurrent.futures
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from retro_jax.retrieval.db import retriever as retriever_lib
from retro_jax.retrieval.embed import embedder as embedder_lib
from retro_jax.retrieval.jobs import build as build_lib
from retro_jax.retrieval.serve import client as client_lib
from retro_jax.retrieval.serve import handler as handler_lib
from retro_jax.retrieval.serve import server as server_lib
from test_build_db import make_db, make_tokenizer, write_corpus  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hashing_retriever(tmp_path_factory):
  return retriever_lib.Retriever.open(make_db(str(tmp_path_factory.mktemp("hash")),
                                              num_docs=10))


@pytest.fixture(scope="module")
def bert_retriever(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("bert"))
  corpus = write_corpus(os.path.join(root, "corpus"), num_docs=4, words_per_doc=(30, 60))
  out = os.path.join(root, "db")
  build_lib.build_database(corpus, make_tokenizer(os.path.join(root, "tok")), out,
                          chunk_size=16, bert=None, shard_size=50)  # the offline MiniLM
  return retriever_lib.Retriever.open(out)


def requests_of(retriever, rng, count):
  """(kind, payload, k, exclude) mixing texts and chunks, k, sizes and exclusion."""
  store = retriever.store
  tokens, docs = np.asarray(store.tokens), np.asarray(store.doc_ids)
  out = []
  for i in range(count):
    k = int(rng.integers(1, 4))
    rows = rng.choice(len(tokens), size=int(rng.integers(1, 4)), replace=False)
    if i % 3 == 0:
      texts = [retriever.tokenizer.decode(tokens[r]) for r in rows]
      texts[0] = " ".join([texts[0]] * int(rng.integers(1, 4)))  # varied lengths
      out.append(("texts", texts, k, None))
    else:
      out.append(("chunks", tokens[rows], k, docs[rows] if i % 3 == 2 else None))
  return out


def check_concurrent_equals_alone(retriever, count, clients):
  """Sends `count` requests from `clients` threads; each answer must equal the in-process
  Retriever's for that request alone, bit for bit."""
  requests = requests_of(retriever, np.random.default_rng(0), count)
  want = [retriever.retrieve_texts(p, k) if kind == "texts"
          else retriever.retrieve_chunks(p, k, exclude_doc_ids=e) for kind, p, k, e in requests]
  config = server_lib.ServiceConfig(max_k=5, workers=4)
  server = server_lib.RetrievalServer(retriever, config=config).start()
  try:
    remote = client_lib.RemoteRetriever(server.url, timeout=120)
    start = threading.Barrier(clients)

    def send(i):
      if i < clients:
        start.wait()
      kind, payload, k, exclude = requests[i]
      return (remote.retrieve_texts(payload, k) if kind == "texts"
              else remote.retrieve_chunks(payload, k, exclude_doc_ids=exclude))

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
      got = list(pool.map(send, range(count)))
    batches = server.batches
  finally:
    server.stop()
  for (kind, _, k, exclude), a, b in zip(requests, got, want):
    np.testing.assert_array_equal(a.ids, b.ids, err_msg=f"{kind} k={k} {exclude}")
    np.testing.assert_array_equal(a.distances, b.distances)
    np.testing.assert_array_equal(a.tokens, b.tokens)
  return batches


def test_concurrent_answers_equal_answers_alone_hashing(hashing_retriever):
  # Nothing to share with this embedder: each worker embeds and searches on its own.
  assert check_concurrent_equals_alone(hashing_retriever, count=96, clients=16) == 0


def test_concurrent_answers_equal_answers_alone_bert(bert_retriever):
  batches = check_concurrent_equals_alone(bert_retriever, count=32, clients=8)
  assert batches < 32  # Requests were coalesced into shared BERT calls.


def test_embedding_requests_together_equals_embedding_them_apart(bert_retriever):
  emb = bert_retriever.embedder
  rng = np.random.default_rng(1)
  words = "alpha beta gamma delta retrieval chunk neighbour token def return".split()
  requests = [[" ".join(rng.choice(words, size=int(rng.integers(1, 12))))
               for _ in range(int(rng.integers(1, 5)))] for _ in range(5)]
  ids = [emb.tokenize(texts) for texts in requests]
  alone = [emb.embed_token_ids(x) for x in ids]
  together = emb.embed_token_ids([row for x in ids for row in x],
                                 pad_lengths=np.concatenate([emb.pad_lengths(x) for x in ids]))
  np.testing.assert_array_equal(together, np.concatenate(alone))
  # As before row-count padding: every call padded to batch_size rows.
  for x, a in zip(ids, alone):
    lengths = emb.pad_lengths(x)
    batch = np.full((emb.batch_size, int(lengths.max())), emb.config.pad_token_id, np.int32)
    mask = np.zeros_like(batch)
    for i, row in enumerate(x):
      batch[i, :len(row)], mask[i, :len(row)] = row, 1
    if len(set(lengths.tolist())) == 1:
      np.testing.assert_array_equal(a, np.asarray(emb._pooled(emb.params, batch, mask))[:len(x)])


def test_usable_prefix_keeps_the_bert_tokens_of_the_whole_text():
  import transformers  # pylint: disable=g-import-not-at-top
  tokenizer = transformers.AutoTokenizer.from_pretrained(embedder_lib.default_checkpoint_dir(),
                                                         local_files_only=True)
  max_length = 64
  rng = np.random.default_rng(2)
  pieces = ["word", "Ünïcödé", "日本語", "x" * 150, "!", ",", " ", "\n", "\t", "e\u0301",
            "longwordpiecesinsequence", "12345", "def f(x):"]
  texts = ["plain words " * 5000, " " * 100_000 + "late words " * 100, "y" * 50_000,
           "a" * 2040 + " tail", "short"]
  for _ in range(150):
    texts.append("".join(rng.choice(pieces, size=int(rng.integers(50, 3000)))))
  for text in texts:
    prefix = handler_lib.usable_prefix(text, tokenizer, max_length, start=256)
    assert text.startswith(prefix)
    full = tokenizer([text], truncation=True, max_length=max_length)["input_ids"]
    cut = tokenizer([prefix], truncation=True, max_length=max_length)["input_ids"]
    assert cut == full, (len(text), len(prefix))
  assert len(handler_lib.usable_prefix(texts[0], tokenizer, max_length, start=256)) == 1024


def test_idle_and_stalled_connections_are_closed(hashing_retriever):
  config = server_lib.ServiceConfig(idle_timeout=0.5, request_timeout=0.5)
  server = server_lib.RetrievalServer(hashing_retriever, config=config).start()
  host, port = server.url.replace("http://", "").split(":")
  threads = threading.active_count()
  socks = [socket.create_connection((host, int(port)), timeout=10) for _ in range(60)]
  for s in socks[40:50]:  # headers started, never finished
    s.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\n")
  for s in socks[50:]:  # a partial body
    s.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
  try:
    assert threading.active_count() == threads  # connections hold no threads.
    t0 = time.monotonic()
    answers = []
    for s in socks:
      data = b""
      while chunk := s.recv(65536):
        data += chunk
      answers.append(data)
    assert time.monotonic() - t0 < 5.0
    assert all(a == b"" for a in answers[:50])  # idle or headers unfinished: closed.
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers[50:])
    assert client_lib.RemoteRetriever(server.url).health()["status"] == "ok"
  finally:
    for s in socks:
      s.close()
    server.stop()


def test_connections_over_the_limit_get_503(hashing_retriever):
  config = server_lib.ServiceConfig(max_connections=3)
  server = server_lib.RetrievalServer(hashing_retriever, config=config).start()
  host, port = server.url.replace("http://", "").split(":")
  socks = [socket.create_connection((host, int(port)), timeout=10) for _ in range(3)]
  try:
    time.sleep(0.2)
    with pytest.raises(client_lib.RetrievalServiceError) as e:
      client_lib.RemoteRetriever(server.url).health()
    assert e.value.status == 503 and "too many connections" in e.value.message
    socks.pop().close()
    time.sleep(0.2)
    assert client_lib.RemoteRetriever(server.url).health()["status"] == "ok"
  finally:
    for s in socks:
      s.close()
    server.stop()


def test_serve_cli_refuses_a_bad_port_in_one_line(hashing_retriever):
  proc = subprocess.run([sys.executable, "-m", "retro_jax.serve",
                         f"--db={hashing_retriever.db.path}", "--port=70000"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "--port" in proc.stderr and "65535" in proc.stderr


def test_bodies_over_the_buffer_budget_get_503(hashing_retriever):
  config = server_lib.ServiceConfig(max_body_bytes=1000, max_buffered_bytes=1000,
                                     request_timeout=5.0)
  server = server_lib.RetrievalServer(hashing_retriever, config=config).start()
  host, port = server.url.replace("http://", "").split(":")
  head = b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\n"
  try:
    first = socket.create_connection((host, int(port)), timeout=10)
    first.sendall(head + b" " * 600)  # 600 bytes held while the rest is awaited
    time.sleep(0.3)
    with socket.create_connection((host, int(port)), timeout=10) as second:
      second.sendall(head + b" " * 600)
      answer = second.recv(65536)
    assert answer.startswith(b"HTTP/1.1 503 ") and b"retry later" in answer
    first.close()
    time.sleep(0.3)  # the first connection's bytes are released when it ends
    remote = client_lib.RemoteRetriever(server.url)
    assert remote.retrieve_texts(["alpha"], 1).ids.shape == (1, 1)
  finally:
    server.stop()
