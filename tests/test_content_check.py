"""Same-shape damage is refused by every long consumer at start (issue #36, item 2).

Rows of tokens.npy, of index/dataset.npy, of a neighbors file or of a checkpoint array
reordered (same shape, same dtype, every id still valid) pass every shape and range check;
train, evaluate and generate must still refuse them in one line naming the file, through
`integrity.check_contents` (recorded sha256) and the checkpoint fingerprint.  Each command's
--skip_content_check turns the check off, which the tests use to prove the check is what
refuses.
"""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from retro_jax import integrity
from retro_jax.evaluation import evaluate as eval_lib
from retro_jax.generation import sampler
from retro_jax.inference import checkpoints as ckpt_lib
from retro_jax.retrieval.db import database as database_lib
from retro_jax.training import checkpoint as checkpoint_lib
from retro_jax.training import train_config
from retro_jax.training import trainer
import fixtures_data as fx  # pylint: disable=g-bad-import-order
from test_evaluate import ROOT, TINY, _cli_env, _params, save_workdir  # pylint: disable=g-bad-import-order
from test_integrity import clean, copy_db, one_line, tree_hash  # pylint: disable=g-bad-import-order,unused-import

PROMPT = " ".join(["alpha beta gamma delta"] * 6)


def reorder_rows(path: str) -> str:
  """Swaps the first two rows of the .npy file at `path` that differ (shape and values kept)."""
  a = np.load(path)
  first = a[0]
  j = next(i for i in range(1, len(a)) if not np.array_equal(a[i], first))
  a[[0, j]] = a[[j, 0]]
  np.save(path, a)
  return path


def dataset_file(db: str) -> str:
  index_dir = os.path.join(db, "index")
  names = [n for n in os.listdir(index_dir) if n.endswith(".npy")]
  assert names, os.listdir(index_dir)
  return os.path.join(index_dir, max(names, key=lambda n: os.path.getsize(
      os.path.join(index_dir, n))))


# --- Databases and neighbors --------------------------------------------------------------

def test_reordered_tokens_stop_evaluate_and_generate(clean, tmp_path):
  db = copy_db(clean, tmp_path)
  tokens = reorder_rows(os.path.join(db, "chunks", "tokens.npy"))
  workdir = save_workdir(str(tmp_path / "retro"), TINY, _params(TINY), db)
  before = tree_hash(db)
  settings = eval_lib.EvalSettings(progress=False, ks=(1,), leakage=False,
                                   retrieval_off=False)
  with pytest.raises(ValueError) as e:
    eval_lib.run_evaluation(workdir, corpus=clean["corpus"], db_dir=db, settings=settings)
  one_line(e.value, tokens, "sha256", "reordered")
  with pytest.raises(ValueError) as e:
    sampler.run_generation(workdir, [PROMPT], db_dir=db,
                           sampling=sampler.SamplingParams(max_new_tokens=1))
  one_line(e.value, tokens, "sha256")
  # The flag turns the check off: the same damage then passes unseen (the old behaviour).
  report = eval_lib.run_evaluation(workdir, corpus=clean["corpus"], db_dir=db,
                                   settings=settings, skip_content_check=True)
  assert report["runs"]
  assert tree_hash(db) == before


def test_reordered_index_file_stops_live_retrieval(clean, tmp_path):
  db = copy_db(clean, tmp_path)
  victim = reorder_rows(dataset_file(db))
  with pytest.raises(ValueError) as e:
    integrity.check_contents(db=database_lib.Database.open(db), db_parts=("chunks", "index"))
  one_line(e.value, victim, "sha256")
  workdir = save_workdir(str(tmp_path / "retro"), TINY, _params(TINY), db)
  with pytest.raises(ValueError) as e:
    sampler.run_generation(workdir, [PROMPT], db_dir=db,
                           sampling=sampler.SamplingParams(max_new_tokens=1))
  one_line(e.value, victim)


def test_evaluate_cli_refuses_reordered_tokens_in_one_line(clean, tmp_path):
  db = copy_db(clean, tmp_path)
  tokens = reorder_rows(os.path.join(db, "chunks", "tokens.npy"))
  workdir = save_workdir(str(tmp_path / "retro"), TINY, _params(TINY), db)
  proc = subprocess.run(
      [sys.executable, "-m", "retro_jax.evaluate", f"--workdir={workdir}", f"--db={db}",
       f"--corpus={clean['corpus']}", "--ks=1", "--noleakage", "--noprogress"],
      capture_output=True, text=True, cwd=ROOT, env=_cli_env(), timeout=300, check=False)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("evaluate: error: ") and tokens in last, last


def test_serve_cli_refuses_a_reordered_index_in_one_line(clean, tmp_path):
  db = copy_db(clean, tmp_path)
  victim = reorder_rows(dataset_file(db))
  proc = subprocess.run(
      [sys.executable, "-m", "retro_jax.serve", f"--db={db}", "--port=0"],
      capture_output=True, text=True, cwd=ROOT, env=_cli_env(), timeout=300, check=False)
  assert proc.returncode == 1, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("serve: error: ") and victim in last, last
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("victim", ["tokens", "neighbors", "eval_neighbors"])
def test_train_refuses_reordered_rows(tmp_path, victim):
  paths = fx.build_dataset(str(tmp_path / "data"))
  path = reorder_rows({
      "tokens": os.path.join(paths["db_dir"], "chunks", "tokens.npy"),
      "neighbors": os.path.join(paths["neighbors_dir"], "neighbors.npy"),
      "eval_neighbors": os.path.join(paths["eval_neighbors_dir"], "neighbors.npy"),
  }[victim])
  cfg = fx.tiny_config(paths)
  model_cfg = train_config.model_config(cfg)
  with pytest.raises(ValueError) as e:
    trainer.open_data(cfg, model_cfg)
  one_line(e.value, path, "sha256", "rebuild")
  trainer.open_data(cfg, model_cfg, check_contents=False)  # the flag: opens as before


# --- Checkpoints ---------------------------------------------------------------------------

def _reorder_saved_params(workdir: str, step: int = 1) -> str:
  """Rewrites checkpoint `step` with the rows of its largest 2-D param swapped, keeping the
  config (and so the fingerprint) saved with the original: a same-shape corruption."""
  ckdir = os.path.join(workdir, "checkpoints")
  ck = checkpoint_lib.Checkpointer(ckdir, async_save=False, verify=False)
  meta = ck.manager.item_metadata(step)["state"]
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), meta)
  state, data, config = ck.restore(step, target)
  flat = jax.tree_util.tree_flatten_with_path(state["params"])[0]
  path, leaf = max(((p, x) for p, x in flat if x.ndim == 2), key=lambda px: px[1].size)
  swapped = jnp.asarray(np.asarray(leaf)[::-1])
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: swapped if p == path else x, state["params"])
  ck.close()
  shutil.rmtree(os.path.join(ckdir, str(step)))
  ck = checkpoint_lib.Checkpointer(ckdir, async_save=False, verify=False)
  ck.manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(dict(state, params=params)), data=ocp.args.JsonSave(data),
      config=ocp.args.JsonSave(config)), force=True)
  ck.close()
  return jax.tree_util.keystr(path)


def test_reordered_checkpoint_array_is_refused(clean, tmp_path):
  workdir = save_workdir(str(tmp_path / "retro"), TINY, _params(TINY), clean["db"])
  leaf = _reorder_saved_params(workdir)
  with pytest.raises(ValueError) as e:
    ckpt_lib.load_model(workdir)
  one_line(e.value, os.path.join(workdir, "checkpoints"), leaf, "fingerprint")
  ckpt_lib.load_model(workdir, check_contents=False)  # the flag: restores as before
  # A resume (train's restore_newest) refuses it too, in one line, touching nothing.
  ck = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  target = jax.tree.map(jnp.zeros_like, {"step": jnp.int32(0), "params": _params(TINY),
                                         "opt_state": {}})
  with pytest.raises(checkpoint_lib.FingerprintError) as e:
    ck.restore(1, target)
  one_line(e.value, leaf)
  ck.close()


def test_fingerprint_does_not_depend_on_sharding_and_sees_a_swap():
  x = jnp.arange(64 * 4, dtype=jnp.float32).reshape(64, 4)
  tree = {"a": x, "b": x.astype(jnp.bfloat16), "c": jnp.int32(3)}
  fp = checkpoint_lib.fingerprint(tree)  # host leaves: numpy
  # On the devices (what accelerators and multi-host states take): the same integers.
  on_device = {f"['{k}']": int(v) for k, v in checkpoint_lib._tree_fingerprint(tree).items()}  # pylint: disable=protected-access
  assert on_device == fp
  mesh = jax.make_mesh((jax.device_count(),), ("d",))
  sharded = jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  assert checkpoint_lib.fingerprint(sharded) == fp
  # Blocks of the host path sum to the whole.
  assert checkpoint_lib._np_fingerprint(np.asarray(x), block=7) == fp["['a']"]  # pylint: disable=protected-access
  for name in ("a", "b"):
    swapped = dict(tree, **{name: tree[name][jnp.array([1, 0] + list(range(2, 64)))]})
    assert checkpoint_lib.fingerprint(swapped)[f"['{name}']"] != fp[f"['{name}']"]


@pytest.mark.parametrize("missing", ["state", "config"])
def test_evaluate_and_generate_fall_back_from_a_step_without_state_or_config(
    clean, tmp_path, missing):
  workdir = save_workdir(str(tmp_path / "retro"), TINY, _params(TINY), clean["db"], step=1)
  save_workdir(workdir, TINY, _params(TINY), clean["db"], step=2)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "2", missing))
  model = ckpt_lib.load_model(workdir)
  assert model.step == 1
  out = sampler.run_generation(workdir, [PROMPT], db_dir=clean["db"],
                               sampling=sampler.SamplingParams(max_new_tokens=1))
  assert out
  with pytest.raises(ValueError) as e:  # asked for by number: one line, no fallback
    ckpt_lib.load_model(workdir, step=2)
  one_line(e.value, "step 2")
