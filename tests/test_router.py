"""Sharded serving (a router over one service per shard) and editing a sharded database."""

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from retro_jax.retrieval.db import access
from retro_jax.retrieval.db import database as database_lib
from retro_jax.retrieval.db import retriever as retriever_lib
from retro_jax.retrieval.db import sharded
from retro_jax.retrieval.jobs import edit as edit_lib
from retro_jax.retrieval.serve import client as client_lib
from retro_jax.retrieval.serve import router as router_lib
from retro_jax.retrieval.serve import server as server_lib
from fixtures_data import stop_process  # pylint: disable=g-bad-import-order
from test_sharded import make_whole_and_sharded  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DOCS = 10
SPLIT = 6  # shard-00000: docs 0-5, shard-00001: docs 6-9
NEW_TEXT = "volcano penguin saxophone glacier orchestra lantern"  # no corpus word


@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
  """(whole database, 2-shard database of the same corpus, tokenizer path)."""
  return make_whole_and_sharded(str(tmp_path_factory.mktemp("router")), NUM_DOCS, (SPLIT,))


class _Shards:
  """In-process shard services (RetrievalServer threads) for the shards of a database."""

  def __init__(self, db_dir, names=None):
    man = sharded.database_manifest(db_dir)
    self.servers = {}
    for entry in man["shards"]:
      if names is None or entry["name"] in names:
        r = retriever_lib.Retriever.open(os.path.join(db_dir, entry["name"]))
        self.servers[entry["name"]] = server_lib.RetrievalServer(r, port=0).start()

  @property
  def addresses(self):
    return {name: s.url for name, s in self.servers.items()}

  def stop(self):
    for s in self.servers.values():
      s.stop()


def _same_or_tied(got, want, atol=1e-6):
  np.testing.assert_allclose(got.distances, want.distances, atol=atol)
  assert ((got.ids == want.ids) | np.isclose(got.distances, want.distances, atol=atol)).all()


def _queries(store, step=5):
  return np.asarray(store.tokens[::step]), np.asarray(store.doc_ids[::step]).astype(np.int64)


def test_search_endpoint_answers_the_index_and_refuses_bad_input(dbs):
  _, db, _ = dbs
  r = retriever_lib.Retriever.open(os.path.join(db, "shard-00000"))
  server = server_lib.RetrievalServer(r, port=0, config=server_lib.ServiceConfig(
      max_batch=8, max_search_k=200)).start()
  try:
    x = r.embed_chunks(np.asarray(r.store.tokens[:3]))
    ids, dist = r.db.index.search(x, 4)
    remote = router_lib.RemoteIndex(server.url, "shard-00000", r.db.manifest)
    remote.verify()
    got_ids, got_dist = remote.search(x, 4)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_dist, dist)  # JSON round-trips float32 exactly.
    # k beyond the shard: padded with -1 / inf like ScannIndex.search.
    big_ids, big_dist = remote.search(x, r.store.num_chunks + 3)
    assert (big_ids[:, -3:] == -1).all() and np.isinf(big_dist[:, -3:]).all()
    client = client_lib.RemoteRetriever(server.url)
    dim = r.db.dim
    # The plain JSON form answers the same as the base64 float32 one RemoteIndex sends.
    ans = client._request("/search", {"embeddings": x.tolist(), "k": 4})  # pylint: disable=protected-access
    np.testing.assert_array_equal(ans["ids"], ids)
    np.testing.assert_array_equal(np.asarray(ans["distances"], np.float32), dist)
    f32 = lambda a: base64.b64encode(np.asarray(a, "<f4").tobytes()).decode()  # pylint: disable=unnecessary-lambda-assignment
    bad = [({"embeddings": [[0.0] * (dim - 1)], "k": 2}, 400, f"list of {dim} numbers"),
           ({"embeddings": [[True] * dim], "k": 2}, 400, "numbers only"),
           ({"embeddings": [["1"] * dim], "k": 2}, 400, "numbers only"),
           ({"embeddings": [[1e39] * dim], "k": 2}, 400, "finite"),
           ({"embeddings": [[10 ** 400] * dim], "k": 2}, 400, "finite"),
           ({"embeddings": [[0.0] * dim], "k": 0}, 400, "positive integer"),
           ({"embeddings": [[0.0] * dim], "k": 201}, 413, "search limit"),
           ({"embeddings": [[0.0] * dim] * 9, "k": 2}, 413, "limit of 8"),
           ({"embeddings": [[0.0] * dim], "k": 2, "extra": 1}, 400, "unknown field"),
           ({"k": 2}, 400, "give 'embeddings'"),
           ({"embeddings": [[0.0] * dim], "embeddings_f32": f32(x), "k": 2}, 400, "give"),
           ({"embeddings_f32": "not base64!", "k": 2}, 400, "not valid base64"),
           ({"embeddings_f32": f32(x)[:-8], "k": 2}, 400, "whole number"),
           ({"embeddings_f32": f32(np.full((1, dim), np.inf)), "k": 2}, 400, "finite"),
           ({"embeddings_f32": f32(np.zeros((9, dim))), "k": 2}, 413, "limit of 8"),
           ({"embeddings_f32": 5, "k": 2}, 400, "base64 string"),
           ({"embeddings": "x", "k": 2}, 400, "list of vectors")]
    for body, status, text in bad:
      with pytest.raises(client_lib.RetrievalServiceError) as e:
        client._request("/search", body)  # pylint: disable=protected-access
      assert e.value.status == status and text in e.value.message, (body, e.value)
    assert client.health()["status"] == "ok"  # Still serving.
  finally:
    server.stop()


def test_router_answers_like_one_index_over_the_union(dbs):
  whole, db, _ = dbs
  shards = _Shards(db)
  router = None
  try:
    router = router_lib.RouterServer(db, shards.addresses, reload_interval=0).start()
    remote = client_lib.RemoteRetriever(router.url, timeout=60)
    local = retriever_lib.Retriever.open(access.open_database(db))
    ref = retriever_lib.Retriever.open(whole)
    queries, docs = _queries(local.store)
    for exclude in (None, docs):
      got = remote.retrieve_chunks(queries, 4, exclude_doc_ids=exclude)
      want = local.retrieve_chunks(queries, 4, exclude_doc_ids=exclude)
      np.testing.assert_array_equal(got.ids, want.ids)
      np.testing.assert_array_equal(got.distances, want.distances)
      np.testing.assert_array_equal(got.tokens, want.tokens)
      assert not hasattr(got, "missing_shards")
      _same_or_tied(got, ref.retrieve_chunks(queries, 4, exclude_doc_ids=exclude))
    # Results come from both shards.
    assert len(set((want.ids.reshape(-1) >= local.db.chunk_offsets[1]).tolist())) == 2
    texts = ["alpha beta gamma", "apple pear plum cherry"]
    got = remote.retrieve_texts(texts, 3)
    np.testing.assert_array_equal(got.ids, local.retrieve_texts(texts, 3).ids)
    _same_or_tied(got, ref.retrieve_texts(texts, 3))
    answer = remote._request("/retrieve", {"texts": texts, "k": 2, "return_texts": True})  # pylint: disable=protected-access
    keys = local.store.doc_keys
    # The document's key, given relative to its corpus (no absolute path leaves the service).
    assert answer["doc_keys"][0][0] == router.handler.public(
        keys[int(local.store.doc_ids[answer["ids"][0][0]])])
    health = remote.health()
    assert health["num_chunks"] == local.store.num_chunks
    assert [s["name"] for s in health["shards"]] == ["shard-00000", "shard-00001"]
    assert remote.manifest == router.handler.public_manifest(local.manifest)  # shards.json
    # The router's own /search answers in global ids.
    x = local.embed_chunks(queries[:2])
    ans = remote._request("/search", {"embeddings": x.tolist(), "k": 3})  # pylint: disable=protected-access
    np.testing.assert_array_equal(ans["ids"], local.db.index.search(x, 3)[0])
  finally:
    if router is not None:
      router.stop()
    shards.stop()


def test_router_refuses_wrong_or_missing_shard_addresses(dbs):
  _, db, _ = dbs
  shards = _Shards(db)
  try:
    a = shards.addresses
    swapped = {"shard-00000": a["shard-00001"], "shard-00001": a["shard-00000"]}
    with pytest.raises(router_lib.ShardMismatchError) as e:
      router_lib.RouterServer(db, swapped, reload_interval=0)
    assert "shard shard-00000 at " + a["shard-00001"] in str(e.value)
    with pytest.raises(router_lib.AddressError, match=r"no address for shard\(s\) "
                       r"\['shard-00001'\]"):
      router_lib.RouterServer(db, {"shard-00000": a["shard-00000"]}, reload_interval=0)
    with pytest.raises(router_lib.AddressError, match="not http://HOST:PORT"):
      router_lib.RouterServer(db, dict(a, **{"shard-00001": "ftp://x"}), reload_interval=0)
  finally:
    shards.stop()


def test_a_shard_that_is_down_is_named_or_left_out(dbs):
  _, db, _ = dbs
  shards = _Shards(db)
  strict = partial = None
  try:
    strict = router_lib.RouterServer(db, shards.addresses, reload_interval=0).start()
    partial = router_lib.RouterServer(db, shards.addresses, reload_interval=0,
                                      allow_partial=True).start()
    local = retriever_lib.Retriever.open(access.open_database(db))
    queries, _ = _queries(local.store)
    down_url = shards.servers["shard-00001"].url
    shards.servers.pop("shard-00001").stop()
    with pytest.raises(client_lib.ServiceUnavailableError) as e:  # One line, names it.
      client_lib.RemoteRetriever(strict.url).retrieve_chunks(queries, 3)
    assert isinstance(e.value, client_lib.ServiceUnavailableAnswer) and e.value.status == 503
    assert f"shard shard-00001 at {down_url} is not available" in str(e.value)
    assert "\n" not in str(e.value)
    got = client_lib.RemoteRetriever(partial.url).retrieve_chunks(queries, 3)
    assert got.missing_shards == ["shard-00001"]
    # What is left is the exact top k of the shard that is up.
    up = retriever_lib.Retriever.open(os.path.join(db, "shard-00000"))
    np.testing.assert_array_equal(got.ids, up.retrieve_chunks(queries, 3).ids)
    # A router started while a shard is down: refused, unless partial answers are allowed.
    with pytest.raises(router_lib.ShardUnavailableError, match=down_url):
      router_lib.RouterServer(db, {"shard-00000": shards.servers["shard-00000"].url,
                                   "shard-00001": down_url}, reload_interval=0)
  finally:
    for r in (strict, partial):
      if r is not None:
        r.stop()
    shards.stop()


def test_a_shard_error_answer_reaches_the_client_as_its_one_line(dbs):
  """A shard refusing the router's search (here: k over its --max_search_k) is named in the
  router's answer, not hidden behind an internal error."""
  _, db, _ = dbs
  servers = {}
  router = None
  try:
    for name in ("shard-00000", "shard-00001"):
      r = retriever_lib.Retriever.open(os.path.join(db, name))
      servers[name] = server_lib.RetrievalServer(r, port=0, config=server_lib.ServiceConfig(
          max_search_k=2 if name == "shard-00001" else 4096)).start()
    router = router_lib.RouterServer(db, {n: s.url for n, s in servers.items()},
                                     reload_interval=0).start()
    local = retriever_lib.Retriever.open(access.open_database(db))
    queries, _ = _queries(local.store)
    with pytest.raises(client_lib.RetrievalServiceError) as e:
      client_lib.RemoteRetriever(router.url).retrieve_chunks(queries, 3)
    assert e.value.status == 500 and "internal error" not in e.value.message
    assert f"shard shard-00001 at {servers['shard-00001'].url}" in e.value.message
    assert "search limit" in e.value.message and "\n" not in e.value.message
    # The router still serves what its shards accept.
    got = client_lib.RemoteRetriever(router.url).retrieve_chunks(queries, 2)
    np.testing.assert_array_equal(got.ids, local.retrieve_chunks(queries, 2).ids)
  finally:
    if router is not None:
      router.stop()
    for s in servers.values():
      s.stop()


def _hashes(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      path = os.path.join(root, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, directory)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _wait(predicate, timeout=60.0):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if predicate():
      return True
    time.sleep(0.05)
  return False


def test_add_then_drop_updates_the_retriever_and_a_running_router(dbs, tmp_path):
  _, src, _ = dbs
  db = str(tmp_path / "db")
  shutil.copytree(src, db)
  before = {n: _hashes(os.path.join(db, n)) for n in ("shard-00000", "shard-00001")}
  shards = _Shards(db)
  addr_file = str(tmp_path / "addresses.json")
  with open(addr_file, "w", encoding="utf-8") as f:
    json.dump(shards.addresses, f)
  router = None
  try:
    router = router_lib.RouterServer(db, address_file=addr_file, reload_interval=0.1).start()
    remote = client_lib.RemoteRetriever(router.url, timeout=60)
    old_chunks = remote.health()["num_chunks"]
    new_docs = tmp_path / "new"
    new_docs.mkdir()
    (new_docs / "news.txt").write_text(NEW_TEXT + "\n", encoding="utf-8")
    man = edit_lib.add_shard(db, str(new_docs))
    assert [s["name"] for s in man["shards"]][-1] == "shard-00002"
    for name, hashes in before.items():  # The other shards are untouched.
      assert _hashes(os.path.join(db, name)) == hashes, name
    new_shard = database_lib.Database.open(os.path.join(db, "shard-00002"))
    assert new_shard.manifest["index"]["settings"] == man["index"]["settings"]
    offset = man["shards"][-1]["chunk_offset"]
    new_doc = man["shards"][-1]["doc_offset"]
    local = retriever_lib.Retriever.open(access.open_database(db))
    assert int(local.retrieve_texts([NEW_TEXT], 3).ids[0, 0]) >= offset  # Rank 1.
    # The router cannot reload until the new shard's service is listed: it says so, and
    # keeps serving the two shards.
    assert _wait(lambda: remote.health()["reload_error"] is not None)
    assert "shard-00002" in remote.health()["reload_error"]
    assert remote.health()["num_chunks"] == old_chunks
    assert int(remote.retrieve_texts([NEW_TEXT], 3).ids[0, 0]) < offset
    # Its address listed before its service is up: the router retries until it answers.
    with socket.socket() as probe:
      probe.bind(("127.0.0.1", 0))
      port = probe.getsockname()[1]
    with open(addr_file, "w", encoding="utf-8") as f:
      json.dump(dict(shards.addresses, **{"shard-00002": f"http://127.0.0.1:{port}"}), f)
    assert _wait(lambda: "shard-00002 at http://127.0.0.1:%d is not available" % port
                 in (remote.health()["reload_error"] or ""))
    shards.servers["shard-00002"] = server_lib.RetrievalServer(
        retriever_lib.Retriever.open(os.path.join(db, "shard-00002")), port=port).start()
    assert _wait(lambda: remote.health()["num_chunks"] == man["num_chunks"])
    assert remote.health()["reload_error"] is None
    got = remote.retrieve_texts([NEW_TEXT], 3)
    np.testing.assert_array_equal(got.ids, local.retrieve_texts([NEW_TEXT], 3).ids)
    assert int(got.ids[0, 0]) >= offset
    # Drop the new document (by its file name): never retrieved again, here or there.
    man, dropped = edit_lib.drop_documents(db, doc_keys=["news.txt"])
    assert dropped == [new_doc] and man["dropped_documents"] == [new_doc]
    local = retriever_lib.Retriever.open(access.open_database(db))
    queries, _ = _queries(local.store, step=1)
    doc_ids = np.asarray(local.store.doc_ids)
    for r in (local, remote):
      if r is remote:
        assert _wait(lambda: remote.health()["reloads"] == 2)
      res = r.retrieve_texts([NEW_TEXT], 5)
      assert new_doc not in doc_ids[res.ids[res.ids >= 0]]
      res = r.retrieve_chunks(queries, 5)
      assert new_doc not in doc_ids[res.ids[res.ids >= 0]]
    with pytest.raises(edit_lib.EditError, match="'nope.txt' is not in"):
      edit_lib.drop_documents(db, doc_keys=["nope.txt"])
    with pytest.raises(edit_lib.EditError, match="document id 99 is not in"):
      edit_lib.drop_documents(db, doc_ids=[99])
  finally:
    if router is not None:
      router.stop()
    shards.stop()


def _start(args, prefix):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.Popen([sys.executable, "-m"] + args, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env), prefix


def _url(proc, prefix):
  line = proc.stdout.readline()
  assert line.startswith(prefix), (line, proc.stderr.read()[-3000:] if proc.poll() is not None
                                   else "")
  return line.split()[3]


def test_serve_and_router_commands_on_loopback(dbs, tmp_path):
  """Real processes: two `serve` shard services and the `router` in front of them."""
  _, db, _ = dbs
  procs = []
  try:
    for name in ("shard-00000", "shard-00001"):
      procs.append(_start(["retro_jax.serve", f"--db={os.path.join(db, name)}",
                           "--port=0"], "retrieval service on "))
    urls = [_url(*p) for p in procs]
    addr = str(tmp_path / "addr.json")
    with open(addr, "w", encoding="utf-8") as f:
      json.dump({"shard-00000": urls[0], "shard-00001": urls[1]}, f)
    procs.append(_start(["retro_jax.serve", f"--db={db}",
                         f"--shard_addresses={addr}", "--port=0"], "retrieval router on "))
    remote = client_lib.RemoteRetriever(_url(*procs[-1]), timeout=60)
    local = retriever_lib.Retriever.open(access.open_database(db))
    queries, docs = _queries(local.store, step=3)
    got = remote.retrieve_chunks(queries, 4, exclude_doc_ids=docs)
    want = local.retrieve_chunks(queries, 4, exclude_doc_ids=docs)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    # A shard process ended: the router names it, in one line.
    stop_process(procs[1][0])
    with pytest.raises(client_lib.ServiceUnavailableError,
                       match=f"shard shard-00001 at {urls[1]}"):
      remote.retrieve_chunks(queries, 4)
  finally:
    for proc, _ in procs:
      stop_process(proc)


def test_edit_db_command(dbs, tmp_path):
  whole, _, _ = dbs
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

  def run(*args):
    return subprocess.run([sys.executable, "-m", "retro_jax.edit_db", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env, check=False)

  db = str(tmp_path / "db")
  proc = run("add", f"--db={whole}", "--corpus=x")
  assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
      f"edit_db: error: {whole} is not a sharded database (no shards.json); convert a whole "
      f"one first: `{edit_lib.SHARD_COMMAND}`"], proc.stderr
  proc = run("shard", f"--db={whole}", f"--output={db}")
  assert proc.returncode == 0, proc.stderr
  assert os.path.islink(os.path.join(db, "shard-00000"))
  new_docs = tmp_path / "new"
  new_docs.mkdir()
  (new_docs / "news.txt").write_text(NEW_TEXT + "\n", encoding="utf-8")
  proc = run("add", f"--db={db}", f"--corpus={new_docs}")
  assert proc.returncode == 0 and "added shard-00001" in proc.stdout, proc.stderr
  r = retriever_lib.Retriever.open(access.open_database(db))
  offset = r.db.chunk_offsets[1]
  assert int(r.retrieve_texts([NEW_TEXT], 2).ids[0, 0]) >= offset
  for args, text in ((("drop", f"--db={db}", "--doc_key=missing.txt"), "'missing.txt' is not in"),
                     (("drop", f"--db={db}", "--doc_id=x"), "--doc_id takes integers"),
                     (("drop", f"--db={db}", "--corpus=c"), "--corpus belongs to `edit_db add`"),
                     (("undo", f"--db={db}"), "give a command first")):
    proc = run(*args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("edit_db: error: ")
    assert text in lines[0], lines
  proc = run("drop", f"--db={db}", "--doc_key=news.txt")
  assert proc.returncode == 0 and "dropped 1 documents" in proc.stdout, proc.stderr
  r = retriever_lib.Retriever.open(access.open_database(db))
  assert (r.retrieve_texts([NEW_TEXT], 2).ids < offset).all()
