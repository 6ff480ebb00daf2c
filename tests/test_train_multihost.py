"""Two CPU processes as two hosts (jax.distributed on 127.0.0.1) train like one process.

Each process owns one CPU device and loads only its half of every global batch; the mesh
spans both processes.  Losses, gradient norms and parameter norms must match a
single-process run over the same data.
"""

import json
import os
import socket
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
pid = int(sys.argv[1])
if pid >= 0:
  jax.distributed.initialize({coordinator!r}, num_processes=2, process_id=pid)
cfg = fx.tiny_config(json.loads({paths!r}), num_steps=8, checkpoint_every=100, log_every=100)
name = "/single" if pid < 0 else "/host" + str(pid)
metrics = {{}}
res = trainer.train_and_evaluate(cfg, {workdir!r} + name, stop_after=4,
                                 on_step=lambda s, m: metrics.__setitem__(s, m))
print("RESULT" + json.dumps(dict(losses=res["losses"], processes=jax.process_count(),
                                 devices=jax.device_count(), metrics=metrics)))
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _result(stdout):
  line = [l for l in stdout.splitlines() if l.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT"):])


def test_two_processes_train_like_one(tmp_path):
  paths = fx.build_dataset(str(tmp_path / "data"))
  code = SCRIPT.format(tests=os.path.join(ROOT, "tests"), paths=json.dumps(paths),
                       workdir=str(tmp_path), coordinator=f"127.0.0.1:{_free_port()}")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in (0, 1)]
  outs = [p.communicate(timeout=1200) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  hosts = [_result(out) for out, _ in outs]
  assert all(h["processes"] == 2 and h["devices"] == 2 for h in hosts)
  single_env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  single = subprocess.run([sys.executable, "-c", code, "-1"], cwd=ROOT, env=single_env,
                          capture_output=True, text=True, timeout=1200)
  assert single.returncode == 0, single.stderr[-4000:]
  ref = _result(single.stdout)["losses"]
  ref_metrics = _result(single.stdout)["metrics"]
  for host in hosts:
    assert host["losses"].keys() == ref.keys() == {"1", "2", "3", "4"}
    for step, loss in ref.items():
      assert host["losses"][step] == pytest.approx(loss, rel=1e-5), step
      # Gradient and parameter norms too: steps 3 and 4 follow updates at a real learning
      # rate, and a wrong cross-host reduction scales the gradient, which AdamW with
      # clipping hides from the losses.
      got, want = host["metrics"][step], ref_metrics[step]
      assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), step
      assert got["param_norm"] == pytest.approx(want["param_norm"], rel=1e-5), step
