"""The router never merges an answer from the wrong index (issue #36, item 1).

A fault probe killed shard-00000's service and started shard-00001's database on its port:
the router answered 200 with other chunk ids and other documents, no "partial", and /health
said ok.  Now every shard answer carries its index id; a mismatch is that shard being down
(503 naming it, or a partial answer with --allow_partial), and /health asks each shard.
"""

import json
import os
import urllib.error
import urllib.request

import numpy as np
import pytest

from retro_jax.retrieval.db import access
from retro_jax.retrieval.db import retriever as retriever_lib
from retro_jax.retrieval.db import sharded
from retro_jax.retrieval.serve import client as client_lib
from retro_jax.retrieval.serve import router as router_lib
from retro_jax.retrieval.serve import server as server_lib
from test_router import _Shards, _queries, dbs  # pylint: disable=g-bad-import-order,unused-import


def _health(url):
  try:
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def test_a_service_replaced_on_a_shard_address_is_never_merged(dbs):  # pylint: disable=redefined-outer-name
  _, db, _ = dbs
  shards = _Shards(db)
  strict = partial = impostor = None
  try:
    strict = router_lib.RouterServer(db, shards.addresses, reload_interval=0).start()
    partial = router_lib.RouterServer(db, shards.addresses, reload_interval=0,
                                      allow_partial=True).start()
    status, health = _health(strict.url)
    assert status == 200 and health["status"] == "ok"
    assert [s["state"] for s in health["shards"]] == ["ok", "ok"]
    local = retriever_lib.Retriever.open(access.open_database(db))
    queries, _ = _queries(local.store)
    before = client_lib.RemoteRetriever(strict.url).retrieve_chunks(queries, 3)
    # shard-00000's service goes; shard-00001's database is served on its address.
    victim = shards.servers.pop("shard-00000")
    port = int(victim.url.rsplit(":", 1)[1])
    victim.stop()
    other = retriever_lib.Retriever.open(os.path.join(db, "shard-00001"))
    impostor = server_lib.RetrievalServer(other, port=port).start()
    with pytest.raises(client_lib.ServiceUnavailableError) as e:
      client_lib.RemoteRetriever(strict.url).retrieve_chunks(queries, 3)
    msg = str(e.value)
    assert e.value.status == 503 and "shard shard-00000" in msg and "\n" not in msg, msg
    got = client_lib.RemoteRetriever(partial.url).retrieve_chunks(queries, 3)
    assert got.missing_shards == ["shard-00000"]
    offset = sharded.ShardedDatabase.open(db).chunk_offsets[1]
    assert (got.ids[got.ids >= 0] >= offset).all()  # only shard-00001's own chunks
    assert not np.array_equal(got.ids, before.ids)
    for router, want_status, want in ((strict, 503, "unavailable"), (partial, 200, "partial")):
      status, health = _health(router.url)
      assert status == want_status and health["status"] == want, health
      states = {s["name"]: s["state"] for s in health["shards"]}
      assert states == {"shard-00000": "wrong index", "shard-00001": "ok"}, health
  finally:
    for r in (strict, partial, impostor):
      if r is not None:
        r.stop()
    shards.stop()


def test_health_names_a_shard_that_is_down(dbs):  # pylint: disable=redefined-outer-name
  _, db, _ = dbs
  shards = _Shards(db)
  router = None
  try:
    router = router_lib.RouterServer(db, shards.addresses, reload_interval=0).start()
    shards.servers.pop("shard-00001").stop()
    status, health = _health(router.url)
    assert status == 503 and health["status"] == "unavailable"
    down = [s for s in health["shards"] if s["state"] == "down"]
    assert [s["name"] for s in down] == ["shard-00001"] and down[0]["error"]
  finally:
    if router is not None:
      router.stop()
    shards.stop()


def test_a_repaired_shard_list_clears_the_reload_error(dbs, tmp_path):  # pylint: disable=redefined-outer-name
  import shutil  # pylint: disable=g-import-not-at-top
  _, db0, _ = dbs
  db = shutil.copytree(db0, str(tmp_path / "db"), symlinks=True)
  shards = _Shards(db)
  router = None
  try:
    router = router_lib.RouterServer(db, shards.addresses, reload_interval=0).start()
    where = os.path.join(db, sharded.SHARDS_FILE)
    with open(where, "rb") as f:
      good = f.read()
    with open(where, "wb") as f:
      f.write(good[:40])
    assert not router.check_for_changes() and router.reload_error
    assert where in _health(router.url)[1]["reload_error"]
    with open(where, "wb") as f:  # put back as it was: what is served is on disk again
      f.write(good)
    router.check_for_changes()
    assert router.reload_error is None and _health(router.url)[1]["reload_error"] is None
  finally:
    if router is not None:
      router.stop()
    shards.stop()


def test_ids_outside_a_shard_are_refused(dbs):  # pylint: disable=redefined-outer-name
  """Defence in depth: even from the listed index, an id beyond the shard's chunks (which
  would index past the database, the probe's 500 IndexError) is that shard failing."""
  _, db, _ = dbs
  shards = _Shards(db, names=["shard-00001"])
  try:
    man = sharded.ShardedDatabase.open(db).shards[1].manifest
    remote = router_lib.RemoteIndex(shards.servers["shard-00001"].url, "shard-00001",
                                    dict(man, num_chunks=2))
    remote.verified = True  # as if checked before the shard grew under the router
    x = np.zeros((1, int(man["embedding"]["dim"])), np.float32)
    x[0, 0] = 1.0
    with pytest.raises(router_lib.ShardUnavailableError, match="outside its 2 chunks"):
      remote.search(x, 3)
  finally:
    shards.stop()
