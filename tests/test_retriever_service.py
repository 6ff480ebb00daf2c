"""Retriever (in-process) and the HTTP service + RemoteRetriever."""

import http.client
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from retro_jax import fileio as manifest_lib
from retro_jax.retrieval.db import retriever as retriever_lib
from retro_jax.retrieval.embed import hashing as hashing_lib
from retro_jax.retrieval.serve import client as client_lib
from retro_jax.retrieval.serve import server as server_lib
import fixtures_data  # pylint: disable=g-bad-import-order
from test_build_db import make_db  # pylint: disable=g-bad-import-order


@pytest.fixture(scope="module")
def db_dir(tmp_path_factory):
  return make_db(str(tmp_path_factory.mktemp("svc")), num_docs=10)


@pytest.fixture(scope="module")
def retriever(db_dir):
  return retriever_lib.Retriever.open(db_dir)


@pytest.fixture(scope="module")
def server(retriever):
  srv = server_lib.RetrievalServer(retriever, "127.0.0.1", 0, max_batch=8, max_k=5,
                                    max_body_bytes=1 << 16).start()
  yield srv
  srv.stop()


def test_retrieve_chunks_finds_itself_and_gathers_tokens(retriever):
  store = retriever.store
  ids_in = np.array([0, 5, store.num_chunks - 1])
  res = retriever.retrieve_chunks(np.asarray(store.tokens[ids_in]), k=3)
  assert res.ids.shape == (3, 3) and res.tokens.shape == (3, 3, 2 * store.chunk_size)
  # A database chunk's nearest neighbor is itself (or an identical twin) at distance 0.
  np.testing.assert_allclose(res.distances[:, 0], 0.0, atol=1e-5)
  assert (np.diff(res.distances, axis=1) >= -1e-6).all()  # sorted nearest first.
  np.testing.assert_array_equal(res.tokens, store.neighbor_tokens(res.ids))
  # Excluding the query's document removes every candidate from it.
  docs = np.asarray(store.doc_ids)[ids_in]
  res = retriever.retrieve_chunks(np.asarray(store.tokens[ids_in]), k=3, exclude_doc_ids=docs)
  assert (np.asarray(store.doc_ids)[res.ids] != docs[:, None]).all()


def test_retrieve_texts(retriever):
  store = retriever.store
  text = retriever.tokenizer.decode(np.asarray(store.tokens[7]))
  res = retriever.retrieve_texts([text, "zzz unrelated"], k=2)
  assert res.ids.shape == (2, 2)
  assert res.distances[0, 0] < 1e-4  # its own text.


def test_retriever_validates_inputs(retriever):
  m = retriever.chunk_size
  with pytest.raises(retriever_lib.RetrievalError, match=f"\\[Q, {m}\\]"):
    retriever.retrieve_chunks(np.zeros((2, m + 1), np.int32), k=2)
  with pytest.raises(retriever_lib.RetrievalError, match="positive"):
    retriever.retrieve_chunks(np.zeros((2, m), np.int32), k=0)
  with pytest.raises(retriever_lib.RetrievalError, match="database size"):
    retriever.retrieve_chunks(np.zeros((2, m), np.int32), k=retriever.store.num_chunks + 1)
  with pytest.raises(retriever_lib.RetrievalError, match="token ids"):
    retriever.retrieve_chunks(np.full((1, m), 10 ** 6), k=1)
  with pytest.raises(retriever_lib.RetrievalError, match="exclude_doc_ids"):
    retriever.retrieve_chunks(np.zeros((2, m), np.int32), k=1, exclude_doc_ids=[0])
  with pytest.raises(retriever_lib.RetrievalError, match="list of strings"):
    retriever.retrieve_texts("not a list", k=1)


def test_retriever_refuses_another_embedder(db_dir):
  with pytest.raises(manifest_lib.ManifestMismatchError) as e:
    retriever_lib.Retriever.open(db_dir, embedder=hashing_lib.HashingEmbedder(16))
  assert "embedder" in str(e.value) and "16" in str(e.value) and "32" in str(e.value)


def test_remote_equals_local(server, retriever):
  remote = client_lib.RemoteRetriever(server.url, timeout=30)
  assert remote.health()["num_chunks"] == retriever.store.num_chunks
  assert remote.manifest == json.loads(json.dumps(server.handler.public_manifest(
      retriever.manifest)))  # no absolute path of the serving machine
  tokens = np.asarray(retriever.store.tokens[10:14])
  docs = np.asarray(retriever.store.doc_ids[10:14])
  a = retriever.retrieve_chunks(tokens, 3, exclude_doc_ids=docs)
  b = remote.retrieve_chunks(tokens, 3, exclude_doc_ids=docs)
  np.testing.assert_array_equal(a.ids, b.ids)
  np.testing.assert_allclose(a.distances, b.distances, rtol=1e-6)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  t = remote.retrieve_texts(["alpha beta gamma"], 2)
  np.testing.assert_array_equal(t.ids, retriever.retrieve_texts(["alpha beta gamma"], 2).ids)


def _post(url, body: bytes, path="/retrieve", headers=None):
  host, port = url.replace("http://", "").split(":")
  conn = http.client.HTTPConnection(host, int(port), timeout=30)
  conn.request("POST", path, body=body, headers=headers or {"Content-Type": "application/json"})
  resp = conn.getresponse()
  data = json.loads(resp.read().decode("utf-8"))
  conn.close()
  return resp.status, data


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, retriever):
  m = retriever.chunk_size
  good_chunk = [1] * m
  cases = [
      (b"{not json", 400, "malformed JSON"),
      (b"[1, 2]", 400, "JSON object"),
      (json.dumps({"texts": ["a"], "k": 1, "colour": "red"}).encode(), 400, "unknown field"),
      (json.dumps({"texts": ["a"]}).encode(), 400, "missing field 'k'"),
      (json.dumps({"texts": ["a"], "chunks": [good_chunk], "k": 1}).encode(), 400,
       "exactly one"),
      (json.dumps({"texts": ["a"] * 9, "k": 1}).encode(), 413, "limit of 8"),
      (json.dumps({"texts": ["a"], "k": 6}).encode(), 413, "limit of 5"),
      (json.dumps({"texts": ["a"], "k": 0}).encode(), 400, "positive"),
      (json.dumps({"texts": ["a"], "k": "2"}).encode(), 400, "positive"),
      (json.dumps({"chunks": [[1, 2, 3]], "k": 1}).encode(), 400, f"list of {m} token ids"),
      (json.dumps({"chunks": [good_chunk], "k": 1, "exclude_doc_ids": [0, 1]}).encode(), 400,
       "exclude_doc_ids"),
      (json.dumps({"chunks": [[10 ** 7] * m], "k": 1}).encode(), 400, "token ids"),
      (json.dumps({"texts": [3], "k": 1}).encode(), 400, "strings"),
      (b"x" * (1 << 17), 413, "exceeds the limit"),
  ]
  for body, status, fragment in cases:
    got_status, data = _post(server.url, body)
    assert got_status == status, (body[:80], data)
    assert fragment in data["error"], (fragment, data)
    assert client_lib.RemoteRetriever(server.url).health()["status"] == "ok"
  status, data = _post(server.url, b"{}", path="/nowhere")
  assert status == 404 and "/retrieve" in data["error"]
  # The client surfaces the server's message.
  with pytest.raises(client_lib.RetrievalServiceError) as e:
    client_lib.RemoteRetriever(server.url).retrieve_texts(["a"], 6)
  assert e.value.status == 413 and "limit of 5" in e.value.message
  # And a good request still works after all of that.
  status, data = _post(server.url, json.dumps({"chunks": [good_chunk], "k": 2,
                                               "return_texts": True}).encode())
  assert status == 200 and len(data["ids"][0]) == 2 and len(data["doc_keys"][0]) == 2
  assert all(os.path.basename(key).startswith("doc") for key in data["doc_keys"][0])


def test_remote_fails_fast_when_service_is_down():
  with socket.socket() as s:  # A port that was free a moment ago: nothing listens there.
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  remote = client_lib.RemoteRetriever(f"http://127.0.0.1:{port}", timeout=5)
  with pytest.raises(client_lib.ServiceUnavailableError, match="not reachable"):
    remote.health()
  with pytest.raises(ConnectionError):
    remote.retrieve_texts(["a"], 1)


def test_remote_times_out_instead_of_hanging():
  # A listening socket that never answers: the client gives up after `timeout`.
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    remote = client_lib.RemoteRetriever(f"http://127.0.0.1:{s.getsockname()[1]}",
                                         timeout=0.5)
    with pytest.raises(client_lib.ServiceUnavailableError, match="not reachable"):
      remote.health()


# --- the show_neighbors and serve CLIs--------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shown_ids(output: str) -> list[int]:
  """Neighbor chunk ids of a show_neighbors report ("[rank] chunk ID  distance ...")."""
  return [int(line.split()[2]) for line in output.splitlines()
          if line.startswith("[") and " chunk " in line]


def test_show_neighbors_cli_shows_what_the_model_reads(db_dir, retriever, tmp_path):
  from retro_jax.retrieval.jobs import precompute as pn_lib  # pylint: disable=g-import-not-at-top

  def run(*flags):
    proc = subprocess.run([sys.executable, "-m", "retro_jax.show_neighbors",
                           f"--db={db_dir}", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout

  store = retriever.store
  c = 7
  doc = int(store.doc_ids[c])
  live = run(f"--chunk_id={c}", "--k=3")
  want = retriever.search_embeddings(np.asarray(retriever.db.embeddings[c:c + 1], np.float32),
                                     3, exclude_doc_ids=[doc]).ids[0]
  assert _shown_ids(live) == want.tolist()
  assert all(int(store.doc_ids[i]) != doc for i in want)
  assert retriever.tokenizer.decode(np.asarray(store.tokens[want[0]])).strip()[:20] in live
  nb_dir = str(tmp_path / "nb")
  pn_lib.precompute_neighbors(db_dir, nb_dir, k=2)
  pre = run(f"--chunk_id={c}", "--k=2", f"--neighbors={nb_dir}")
  assert _shown_ids(pre) == np.load(os.path.join(nb_dir, "neighbors.npy"))[c].tolist()
  text = retriever.tokenizer.decode(np.asarray(store.tokens[c]))
  assert _shown_ids(run(f"--text={text}", "--k=2")) == (
      retriever.retrieve_texts([text], 2).ids[0].tolist())
  bad = subprocess.run([sys.executable, "-m", "retro_jax.show_neighbors", f"--db={db_dir}",
                        f"--chunk_id={store.num_chunks}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "outside the database" in bad.stderr


def test_serve_cli_answers_like_the_local_retriever(db_dir, retriever):
  proc = subprocess.Popen([sys.executable, "-m", "retro_jax.serve", f"--db={db_dir}",
                           "--port=0"], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stdout.readline()
    assert line.startswith("retrieval service on "), (line, proc.stderr.read()[-2000:]
                                                      if proc.poll() is not None else "")
    url = line.split()[3]
    remote = client_lib.RemoteRetriever(url, timeout=60)
    assert remote.health()["status"] == "ok"
    chunks = np.asarray(retriever.store.tokens[[0, 9, 20]])
    got, want = remote.retrieve_chunks(chunks, 2), retriever.retrieve_chunks(chunks, 2)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.tokens, want.tokens)
  finally:
    fixtures_data.stop_process(proc)


def test_damaged_chunk_store_answer_names_tokens_npy_and_the_fix(tmp_path, caplog):
  """Token ids outside the vocabulary in DB/chunks/tokens.npy: a 500 whose JSON message is
  the check's one line (the file and the rebuild), not a generic internal error."""
  db = make_db(str(tmp_path), num_docs=4)
  path = os.path.join(db, "chunks", "tokens.npy")
  tokens = np.load(path)
  vocab = retriever_lib.Retriever.open(db).store.vocab_size
  np.save(path, np.where(tokens >= 0, vocab + 7, tokens).astype(np.int32))
  srv = server_lib.RetrievalServer(retriever_lib.Retriever.open(db), "127.0.0.1", 0).start()
  try:
    client = client_lib.RemoteRetriever(srv.url)
    with pytest.raises(client_lib.RetrievalServiceError) as e:
      client.retrieve_texts(["alpha beta gamma"], k=2)
    assert e.value.status == 500
    line = str(e.value)
    assert "\n" not in line and path in line and f"token id {vocab + 7}" in line, line
    assert "build_db" in line and "internal error" not in line, line
    host, port = srv.url.rsplit("/", 1)[-1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/retrieve", json.dumps({"texts": ["alpha"], "k": 1}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 500 and body["error"].startswith(path), body
    assert client.health()["status"] == "ok"  # the server keeps serving
  finally:
    srv.stop()


def test_each_request_is_logged_at_the_chosen_level(retriever, caplog):
  import logging  # pylint: disable=g-import-not-at-top
  import urllib.error  # pylint: disable=g-import-not-at-top
  import urllib.request  # pylint: disable=g-import-not-at-top
  for level, want in (("info", logging.INFO), ("debug", logging.DEBUG), ("off", None)):
    srv = server_lib.RetrievalServer(retriever, "127.0.0.1", 0, config=server_lib.ServiceConfig(
        log_requests=level)).start()
    caplog.clear()
    try:
      with caplog.at_level(logging.DEBUG):
        urllib.request.urlopen(srv.url + "/health", timeout=30).read()
        body = json.dumps({"texts": ["def f(x):"], "k": 2}).encode()
        urllib.request.urlopen(urllib.request.Request(srv.url + "/retrieve", data=body),
                               timeout=60).read()
        with pytest.raises(urllib.error.HTTPError):
          urllib.request.urlopen(srv.url + "/nowhere", timeout=30)
    finally:
      srv.stop()
    lines = [r for r in caplog.records if r.getMessage().startswith("RetrievalServer ")]
    if want is None:
      assert not lines
      continue
    got = [" ".join(r.getMessage().split()[1:4]) for r in lines]
    assert got == ["GET /health 200", "POST /retrieve 200", "GET /nowhere 404"], got
    assert all(r.levelno == want and " ms " in r.getMessage() for r in lines)
  with pytest.raises(ValueError, match="log_requests"):
    server_lib.ServiceConfig(log_requests="loud")
