"""Cost of the start-up content checks (#36) on a quickstart work directory:

  PYTHONPATH=$PWD python experiments/benchmarks/bench_content_check.py runs/quickstart

Times `integrity.check_contents` for what train, evaluate (precomputed neighbors) and
evaluate/generate with live retrieval read, load_model with and without the checkpoint
fingerprint, and the fingerprint of the params alone.  Prints JSON."""
import json
import os
import sys
import time

import jax
from retro_jax import integrity
from retro_jax.retrieval.db import sharded
from retro_jax.retrieval.store import chunk_store as cs
from retro_jax.inference import checkpoints as ck
Q = sys.argv[1]
db = sharded.open_database(os.path.join(Q, "db"))
ev = cs.ChunkStore.open(os.path.join(Q, "eval_chunks"))
def t(f):
  s = time.perf_counter(); f(); return time.perf_counter() - s
train = t(lambda: integrity.check_contents(stores=[db.store, ev], neighbors=[os.path.join(Q, "neighbors/train"), os.path.join(Q, "neighbors/eval")], job="train"))
ev_pre = t(lambda: integrity.check_contents(db=db, db_parts=("chunks",), stores=[ev], neighbors=[os.path.join(Q, "neighbors/eval")], job="evaluate (precomputed)"))
ev_live = t(lambda: integrity.check_contents(db=db, db_parts=("chunks", "index"), stores=[ev], job="evaluate (live)"))
wd = os.path.join(Q, "runs", "retro")
with_fp = t(lambda: ck.load_model(wd, check_contents=True))
without = t(lambda: ck.load_model(wd, check_contents=False))
with_fp2 = t(lambda: ck.load_model(wd, check_contents=True))
print(json.dumps(dict(train_data=train, eval_precomputed=ev_pre, eval_live=ev_live,
                      load_model_with_fingerprint=[with_fp, with_fp2], load_model_without=without)))
from retro_jax.training import checkpoint as checkpoint_lib
m = ck.load_model(wd, check_contents=False)
first = t(lambda: checkpoint_lib.fingerprint(m.params))
again = t(lambda: checkpoint_lib.fingerprint(m.params))
print(json.dumps(dict(params_fingerprint_first_call=first, params_fingerprint_cached=again)))
n = sum(x.size for x in jax.tree.leaves(m.params))
print(json.dumps(dict(params=int(n))))
