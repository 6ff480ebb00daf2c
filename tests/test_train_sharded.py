"""8 simulated devices (data x fsdp x tensor = 2 x 2 x 2) train exactly like one device.

The device count is fixed when JAX starts, so the comparison runs in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8; there both runs use the same data
and init (parameters are created directly in their shards on the 2x2x2 mesh).
"""

import json
import os
import subprocess
import sys

import pytest

import fixtures_data as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys
sys.path.insert(0, {tests!r})
import jax
import fixtures_data as fx
from retro_jax.training import trainer
fx.enable_compilation_cache()
paths = json.loads({paths!r})
import numpy as np
out, params = {{}}, {{}}
for name, mesh, devices in (("one", (1, 1, 1), jax.devices()[:1]),
                            ("eight", (2, 2, 2), jax.devices())):
  cfg = fx.tiny_config(paths, num_steps=8, checkpoint_every=100, log_every=100)
  # The reading options too: the copy head's scatter and pointer, the rank bias, the CCA
  # gate, alignment.
  cfg.model.copy_head = cfg.model.cca_rank_bias = cfg.model.align_neighbors = True
  cfg.model.cca_gate = True
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
  metrics = {{}}
  res = trainer.train_and_evaluate(cfg, {workdir!r} + "/" + name, stop_after=4,
                                   devices=devices,
                                   on_step=lambda s, m: metrics.__setitem__(s, m))
  leaf = res["state"].params["layer_1"]["cca"]["attn"]["wq"]
  out[name] = dict(losses=res["losses"], shards=len(leaf.addressable_shards),
                   spec=str(leaf.sharding.spec), metrics=metrics)
  params[name] = jax.tree.leaves(res["state"].params)
out["param_diff"] = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                        for a, b in zip(params["one"], params["eight"]))
out["param_moved"] = max(float(np.abs(np.asarray(a)).max()) for a in params["one"])
print("RESULT" + json.dumps(out))
"""


def test_2x2x2_mesh_matches_one_device(tmp_path):
  paths = fx.build_dataset(str(tmp_path / "data"))
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
             + " --xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  code = SCRIPT.format(tests=os.path.join(ROOT, "tests"), paths=json.dumps(paths),
                       workdir=str(tmp_path))
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  out = json.loads(line[len("RESULT"):])
  # Parameters really are split: the CCA query kernel [embed, heads, kv] is sharded over
  # fsdp (embed) and tensor (heads), 8 shards of which each device holds one.
  assert out["eight"]["shards"] == 8 and "fsdp" in out["eight"]["spec"]
  assert out["one"]["losses"].keys() == out["eight"]["losses"].keys() == {"1", "2", "3", "4"}
  for step, loss in out["one"]["losses"].items():
    assert out["eight"]["losses"][step] == pytest.approx(loss, rel=1e-4, abs=1e-5), step
    # Gradients, not only losses: a wrong all-reduce factor scales them (and AdamW with
    # clipping would hide that scale from the losses and parameters).
    one, eight = out["one"]["metrics"][step], out["eight"]["metrics"][step]
    assert eight["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4), step
    assert eight["param_norm"] == pytest.approx(one["param_norm"], rel=1e-5), step
  # The 4 steps' updates (3 at a real learning rate) land on the same parameters.
  assert out["param_diff"] < 1e-4 * out["param_moved"], out["param_diff"]
