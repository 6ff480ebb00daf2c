"""A Beam job on the DirectRunner stays on this machine and dies with its driver (issue #36).

apache-beam 2.78's "DirectRunner" first tries its Prism runner, which downloads an
executable from GitHub at run time.  `--runner=DirectRunner` must run Beam's classic Python
runner instead and open no socket to anything but loopback: the build runs as the real
command with a `sitecustomize` on PYTHONPATH that refuses (and records) every name lookup
and every connection to a non-loopback host, in the driver and in each worker process.
Then a driver killed with SIGKILL must leave none of its multi_processing workers behind.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fixtures_data import stdlib_texts  # pylint: disable=g-bad-import-order
from test_build_db import make_tokenizer  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = "--direct_num_workers=2 --direct_running_mode=multi_processing"

GUARD = textwrap.dedent('''
    """Test guard: refuses and records every lookup or connection beyond loopback."""
    import os
    import socket

    _LOG = os.environ.get("RETRO_JAX_NET_LOG")
    _LOCAL = ("localhost", "127.0.0.1", "::1", "0.0.0.0", "::", "", None)

    def _local(host):
      if isinstance(host, bytes):
        host = host.decode()
      return host in _LOCAL or (isinstance(host, str) and host.startswith("127."))

    def _refuse(what):
      with open(_LOG, "a") as f:
        f.write(f"{os.getpid()} {what}\\n")
      raise OSError(f"network access refused by the test: {what}")

    if _LOG:
      _getaddrinfo, _connect, _connect_ex = (socket.getaddrinfo, socket.socket.connect,
                                             socket.socket.connect_ex)

      def getaddrinfo(host, *args, **kwargs):
        if not _local(host):
          _refuse(f"getaddrinfo {host}")
        return _getaddrinfo(host, *args, **kwargs)

      def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
          _refuse(f"connect {address}")
        return _connect(self, address)

      def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
          _refuse(f"connect {address}")
        return _connect_ex(self, address)

      socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = (
          getaddrinfo, connect, connect_ex)
''')


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("beam_local"))
  corpus = os.path.join(root, "corpus")
  os.makedirs(corpus)
  for key, text in stdlib_texts(6, 1200):
    with open(os.path.join(corpus, key + ".txt"), "w", encoding="utf-8") as f:
      f.write(text)
  guard = os.path.join(root, "guard")
  os.makedirs(guard)
  with open(os.path.join(guard, "sitecustomize.py"), "w", encoding="utf-8") as f:
    f.write(GUARD)
  return dict(root=root, corpus=corpus, tok=make_tokenizer(os.path.join(root, "tok")),
              guard=guard)


def _env(inputs, log):  # pylint: disable=redefined-outer-name
  return dict(os.environ, PYTHONPATH=os.pathsep.join([inputs["guard"], ROOT]),
              RETRO_JAX_NET_LOG=log, JAX_PLATFORMS="cpu")


def _build_argv(inputs, out, extra=()):  # pylint: disable=redefined-outer-name
  return [sys.executable, "-m", "retro_jax.build_db", f"--corpus={inputs['corpus']}",
          f"--tokenizer={inputs['tok']}", f"--output={out}", "--chunk_size=16",
          "--bert=hashing:32", "--shard_size=40", "--runner=DirectRunner", "--num_shards=2",
          *extra]


def test_guard_sees_a_lookup(inputs, tmp_path):  # the guard itself can fail
  log = str(tmp_path / "net.log")
  proc = subprocess.run([sys.executable, "-c", "import socket; socket.getaddrinfo("
                         "'github.com', 443)"], env=_env(inputs, log), capture_output=True,
                        text=True, timeout=60, check=False)
  assert proc.returncode != 0 and "github.com" in open(log, encoding="utf-8").read()


@pytest.mark.parametrize("options", ["", WORKERS])
def test_direct_runner_opens_no_socket_beyond_loopback(inputs, tmp_path, options):
  log = str(tmp_path / "net.log")
  out = str(tmp_path / "db")
  extra = [f"--beam_options={options}"] if options else []
  proc = subprocess.run(_build_argv(inputs, out, extra), env=_env(inputs, log), cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=False)
  attempts = open(log, encoding="utf-8").read() if os.path.exists(log) else ""
  assert not attempts, attempts
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Prism" not in proc.stderr, proc.stderr[-3000:]
  assert os.path.exists(os.path.join(out, "shards.json"))


def _descendants(pid: int) -> list[int]:
  children = {}
  for name in os.listdir("/proc"):
    if name.isdigit():
      try:
        with open(f"/proc/{name}/stat", encoding="utf-8") as f:
          ppid = int(f.read().rsplit(")", 1)[1].split()[1])
      except (OSError, IndexError, ValueError):
        continue
      children.setdefault(ppid, []).append(int(name))
  out, todo = [], [pid]
  while todo:
    for c in children.get(todo.pop(), []):
      out.append(c)
      todo.append(c)
  return out


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def _is_worker(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return b"sdk_worker_main" in f.read()
  except OSError:
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_end_with_a_killed_driver(inputs, tmp_path):
  # A corpus big enough that the workers are still embedding when the driver is killed.
  corpus = str(tmp_path / "corpus")
  os.makedirs(corpus)
  for key, text in stdlib_texts(40, 6000):
    with open(os.path.join(corpus, key + ".txt"), "w", encoding="utf-8") as f:
      f.write(text)
  argv = _build_argv(dict(inputs, corpus=corpus), str(tmp_path / "db"),
                     [f"--beam_options={WORKERS}", "--embed_batch_size=1"])
  driver = subprocess.Popen(argv, env=_env(inputs, str(tmp_path / "net.log")), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline, workers = time.time() + 240, []
    while time.time() < deadline and len(workers) < 2 and driver.poll() is None:
      time.sleep(0.5)
      workers = [p for p in _descendants(driver.pid) if _is_worker(p)]
    assert workers, "no multi_processing worker started"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(p) for p in workers):
      time.sleep(0.5)
    left = [p for p in workers if _alive(p)]
    for p in left:  # clean up after a failure
      os.kill(p, signal.SIGKILL)
    assert not left, f"workers {left} outlived their killed driver"
  finally:
    if driver.poll() is None:
      driver.kill()
