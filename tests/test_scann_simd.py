"""ScaNN's AVX2/AVX-512 kernels: switched on where the CPU has them, same results."""

import platform

import numpy as np
import pytest

from retro_jax.retrieval.search import scann as index_lib
from retro_jax.retrieval.search import scann_simd

scann = pytest.importorskip("scann")

X86 = platform.machine().lower() in ("x86_64", "amd64")
HAS_AVX2 = X86 and {"avx2", "fma"} <= scann_simd.cpu_flags()
ALL_FLAGS = {f for need in scann_simd.REQUIRES.values() for f in need}


def _library():
  return scann.scann_ops_pybind.scann_pybind.__file__


@pytest.fixture
def flags():
  """ScaNN's dispatch flags, restored after the test (they are process-wide)."""
  found = scann_simd.flags_of(_library())
  if set(found) != set(scann_simd.FLAG_SYMBOLS):
    pytest.skip("this ScaNN build exports no dispatch flags")
  saved = {level: flag.value for level, flag in found.items()}
  yield found
  for level, flag in found.items():
    flag.value = saved[level]


def test_cpu_flags_reads_the_first_flags_line(tmp_path):
  info = tmp_path / "cpuinfo"
  info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse4_2 avx avx2 fma\n\n"
                  "processor\t: 1\nflags\t\t: fpu\n")
  assert scann_simd.cpu_flags(str(info)) == {"fpu", "sse4_2", "avx", "avx2", "fma"}
  assert scann_simd.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_bad_mode_is_named(monkeypatch):
  with pytest.raises(ValueError, match="RETRO_JAX_SCANN_SIMD.*'fast'"):
    scann_simd.enable(_library(), mode="fast")
  monkeypatch.setenv(scann_simd.ENV_VAR, "sse")
  with pytest.raises(ValueError, match="RETRO_JAX_SCANN_SIMD.*'sse'"):
    scann_simd.enable(_library())


def test_no_extension_changes_nothing(tmp_path):
  """Another ScaNN packaging (no pybind file, or one that will not load) is left alone."""
  bad = tmp_path / "not_a_library.so"
  bad.write_bytes(b"not an ELF file")
  for path in (None, str(bad)):
    state = scann_simd.enable(path, mode="auto", cpu=ALL_FLAGS)
    assert state["raised"] == [] and state["avx2"] is None and state["avx512"] is None


@pytest.mark.skipif(not X86, reason="ScaNN's dispatch flags exist on x86 only")
def test_enable_raises_only_what_the_cpu_and_mode_allow(flags, monkeypatch):
  def reset(avx2=False, avx512=False):
    flags["avx2"].value, flags["avx512"].value = avx2, avx512

  def now():
    return flags["avx2"].value, flags["avx512"].value

  reset()
  monkeypatch.setenv(scann_simd.ENV_VAR, "off")
  assert scann_simd.enable(_library(), cpu=ALL_FLAGS)["raised"] == []
  assert now() == (False, False)
  monkeypatch.delenv(scann_simd.ENV_VAR)
  scann_simd.enable(_library(), cpu={"avx", "avx2"})  # No FMA: AVX2 kernels need it.
  assert now() == (False, False)
  state = scann_simd.enable(_library(), cpu={"avx2", "fma", "avx512f", "avx512dq"})
  assert now() == (True, False) and state["raised"] == ["avx2"]  # No AVX512BW.
  reset()
  state = scann_simd.enable(_library(), mode="avx2", cpu=ALL_FLAGS)
  assert now() == (True, False) and state["avx512"] is False
  reset()
  state = scann_simd.enable(_library(), cpu=ALL_FLAGS)
  assert now() == (True, True) and state["raised"] == ["avx2", "avx512"]
  assert scann_simd.state() == state
  reset(True, False)  # Only what was off is reported as raised.
  assert scann_simd.enable(_library(), cpu=ALL_FLAGS)["raised"] == ["avx512"]
  reset(True, True)  # A wheel whose own detection worked is left alone, even with "off".
  assert scann_simd.enable(_library(), mode="off", cpu=())["raised"] == []
  assert now() == (True, True)


@pytest.mark.skipif(not HAS_AVX2, reason="needs an x86 CPU with AVX2 and FMA")
def test_index_runs_scann_with_this_cpus_kernels(flags):
  index_lib._scann()  # pylint: disable=protected-access
  assert flags["avx2"].value
  wants_avx512 = set(scann_simd.REQUIRES["avx512"]) <= scann_simd.cpu_flags()
  assert flags["avx512"].value == wants_avx512


@pytest.mark.skipif(not HAS_AVX2, reason="needs an x86 CPU with AVX2 and FMA")
def test_search_results_agree_across_kernels(flags):
  rng = np.random.default_rng(0)
  x = index_lib.normalize(rng.standard_normal((3000, 64)).astype(np.float32))
  noise = index_lib.normalize(rng.standard_normal((200, 64)).astype(np.float32))
  q = index_lib.normalize(x[:200] + 0.5 * noise)
  tree = index_lib.ScannIndex.build(x, mode="tree_ah", recall_ks=(), num_threads=1)
  brute = index_lib.ScannIndex.build(x, mode="brute_force", recall_ks=())
  results = {}
  for on in (True, False):
    for flag in flags.values():
      flag.value = on
    results[on] = (tree.search(q, 10), brute.search(q, 10))
  (t_fast, b_fast), (t_slow, b_slow) = results[True], results[False]
  np.testing.assert_array_equal(t_fast[0], t_slow[0])
  np.testing.assert_allclose(t_fast[1], t_slow[1], atol=1e-5)
  np.testing.assert_array_equal(b_fast[0], b_slow[0])
  np.testing.assert_allclose(b_fast[1], b_slow[1], atol=1e-5)
