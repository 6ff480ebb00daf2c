"""The glibc malloc settings of the command-line entry points (retro_jax/host_malloc.py)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from retro_jax import host_malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
glibc_only = pytest.mark.skipif(not host_malloc._is_glibc_linux(),  # pylint: disable=protected-access
                                reason="the settings are glibc tunables")


@glibc_only
def test_environ_adds_settings_and_keeps_the_users_own_last():
  env = host_malloc.tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4", "X": "1"})
  parts = env["GLIBC_TUNABLES"].split(":")
  assert parts[:len(host_malloc.TUNABLES)] == list(host_malloc.TUNABLES)
  assert parts[-1] == "glibc.malloc.arena_max=4"  # later entries win in glibc
  assert env["X"] == "1"


@glibc_only
@pytest.mark.parametrize("value", ["system", "OFF", "0"])
def test_opt_out(value):
  assert host_malloc.tuned_environ({host_malloc.OPT_OUT_VAR: value}) is None


@glibc_only
def test_no_second_reexec():
  env = host_malloc.tuned_environ({})
  assert host_malloc.tuned_environ(env) is None


@pytest.mark.parametrize("value", ["sytem", "maybe"])
def test_unknown_value_is_a_clear_error_not_a_silent_opt_in(value):
  with pytest.raises(ValueError, match=r"RETRO_JAX_MALLOC='%s'.*'system'" % value):
    host_malloc.tuned_environ({host_malloc.OPT_OUT_VAR: value})


def test_cli_exits_with_one_line_on_an_unknown_value():
  env = dict(host_malloc.without_settings(os.environ), **{host_malloc.OPT_OUT_VAR: "sytem"})
  out = subprocess.run([sys.executable, "-m", "retro_jax.train", "--helpshort"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [
      "train: error: RETRO_JAX_MALLOC='sytem': expected 'system' (glibc's malloc defaults) or "
      "'tuned' (the default)"]


def test_without_settings_strips_only_ours():
  env = host_malloc.without_settings({"GLIBC_TUNABLES": "x", host_malloc.OPT_OUT_VAR: "system",
                                      host_malloc.APPLIED_VAR: "1", "PATH": "/bin"})
  assert env == {"PATH": "/bin"}


def test_nothing_to_do_off_glibc(monkeypatch):
  monkeypatch.setattr(host_malloc, "_is_glibc_linux", lambda: False)
  assert host_malloc.tuned_environ({}) is None


_PROBE = textwrap.dedent("""
    import ctypes, json, resource, sys, threading
    sys.path.insert(0, {repo!r})
    from retro_jax import host_malloc
    host_malloc.reexec_with_tuned_malloc()
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, faults = 128 << 20, []
    def work():  # like an XLA executor thread: a large block per "step"
      for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    t = threading.Thread(target=work)
    t.start(); t.join()
    print(json.dumps(dict(applied=host_malloc.applied(), pages=size // 4096, faults=faults)))
""")


def _probe(tmp_path, **env):
  script = tmp_path / "probe.py"
  script.write_text(_PROBE.format(repo=REPO))
  full = host_malloc.without_settings(os.environ)
  full.update(env)
  out = subprocess.run([sys.executable, str(script)], env=full, capture_output=True, text=True,
                       check=True, timeout=120)
  return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_reexec_keeps_a_threads_large_block_mapped_between_steps(tmp_path):
  tuned = _probe(tmp_path)
  system = _probe(tmp_path, **{host_malloc.OPT_OUT_VAR: "system"})
  assert tuned["applied"] and not system["applied"]
  pages = tuned["pages"]
  # glibc defaults: every "step" maps the block afresh and faults in every page again.
  assert min(system["faults"][1:]) > pages // 2, system
  # With the settings only the first step faults; later ones reuse the mapped heap.
  assert tuned["faults"][0] > pages // 2, tuned
  assert max(tuned["faults"][1:]) < pages // 20, tuned


ENTRY_POINTS = ("retro_jax/train.py", "retro_jax/evaluate.py", "retro_jax/generate.py",
                "retro_jax/quickstart.py", "retro_jax/build_db.py",
                "retro_jax/precompute_neighbors.py",
                "retro_jax/train_tokenizer.py", "retro_jax/show_neighbors.py")


def _calls(path, function=None):
  """Calls made by the __main__ block of `path` (or by its top-level `function`), in order."""
  import ast  # pylint: disable=g-import-not-at-top
  tree = ast.parse(open(os.path.join(REPO, path), encoding="utf-8").read())
  if function is None:
    blocks = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
  else:
    blocks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function]
  assert len(blocks) == 1, path
  return [ast.unparse(c.func) for c in ast.walk(blocks[0]) if isinstance(c, ast.Call)]


def _reexecs_before_app_run(calls):
  return ("host_malloc.reexec_with_tuned_malloc" in calls and "app.run" in calls and
          calls.index("host_malloc.reexec_with_tuned_malloc") < calls.index("app.run"))


@pytest.mark.parametrize("path", ENTRY_POINTS)
def test_entry_points_reexec_before_running(path):
  """Each CLI's __main__ block calls reexec_with_tuned_malloc before app.run: itself, through
  `_cli.run` (which does), or by running the module that now holds the command."""
  calls = _calls(path)
  if "runpy.run_module" in calls:  # an older module path of a command
    return
  if "_cli.run" in calls:
    calls = _calls("retro_jax/_cli.py", "run")
  assert _reexecs_before_app_run(calls), calls
