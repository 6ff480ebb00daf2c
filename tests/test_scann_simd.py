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


# The flags line of an AMD EPYC with AVX2 and FMA but no AVX-512 (one of the CI machines).
EPYC_AVX2_ONLY = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush "
                  "mmx fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm rep_good nopl "
                  "cpuid extd_apicid pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 x2apic movbe popcnt "
                  "aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a "
                  "misalignsse 3dnowprefetch osvw topoext bmi1 avx2 smep bmi2 rdseed adx smap "
                  "clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 xsaves clzero xsaveerptr rdpru")


def _expected(mode, cpu):
  """The levels `enable` may raise for this mode on a CPU with these flags."""
  wanted = {"auto": ("avx2", "avx512"), "avx2": ("avx2",), "off": ()}[mode]
  return [lvl for lvl in wanted if set(scann_simd.REQUIRES[lvl]) <= set(cpu)]


def test_a_cpu_without_avx512_never_gets_avx512(tmp_path):
  """Read from a cpuinfo without avx512*, no mode raises AVX-512 (only the flag is set here)."""
  info = tmp_path / "cpuinfo"
  info.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {EPYC_AVX2_ONLY}\n")
  cpu = scann_simd.cpu_flags(str(info))
  assert "avx2" in cpu and not any(f.startswith("avx512") for f in cpu)
  for mode in scann_simd.MODES:
    assert "avx512" not in _expected(mode, cpu)
  if not X86:
    return
  found = scann_simd.flags_of(_library())
  if set(found) != set(scann_simd.FLAG_SYMBOLS):
    pytest.skip("this ScaNN build exports no dispatch flags")
  saved = {level: flag.value for level, flag in found.items()}
  try:
    for mode in scann_simd.MODES:
      for flag in found.values():
        flag.value = False
      state = scann_simd.enable(_library(), mode=mode, cpu=cpu)
      assert found["avx512"].value is False and state["avx512"] is False
      assert state["raised"] == _expected(mode, cpu)
  finally:
    for level, flag in found.items():
      flag.value = saved[level]


@pytest.mark.skipif(not HAS_AVX2, reason="needs an x86 CPU with AVX2 and FMA")
def test_index_runs_scann_with_this_cpus_kernels(flags, monkeypatch):
  """The index turns on what this CPU and RETRO_JAX_SCANN_SIMD allow, and nothing more."""
  for flag in flags.values():  # As the PyPI wheel leaves them.
    flag.value = False
  monkeypatch.setattr(index_lib, "_SIMD_DONE", False)
  index_lib._scann()  # pylint: disable=protected-access
  want = _expected(scann_simd._mode(None), scann_simd.cpu_flags())  # pylint: disable=protected-access
  assert flags["avx2"].value == ("avx2" in want)
  assert flags["avx512"].value == ("avx512" in want)


def _cpus_to_compare():
  """This CPU's flags, and (on a CPU with AVX-512) the same CPU seen as AVX2-only."""
  real = scann_simd.cpu_flags()
  out = [pytest.param(real, id="this_cpu")]
  if any(f.startswith("avx512") for f in real):
    out.append(pytest.param(frozenset(f for f in real if not f.startswith("avx512")),
                            id="this_cpu_without_avx512"))
  return out


@pytest.mark.skipif(not HAS_AVX2, reason="needs an x86 CPU with AVX2 and FMA")
@pytest.mark.parametrize("cpu", _cpus_to_compare())
def test_search_results_agree_across_kernels(flags, cpu, monkeypatch):
  """Each kernel level `enable` turns on for this CPU (and mode) gives the fallback's results.

  Levels are raised one at a time, in ScaNN's order, and only those `enable` chose: a level
  the CPU lacks is never switched on (that would kill the process with SIGILL).
  """
  for flag in flags.values():
    flag.value = False
  levels = scann_simd.enable(_library(), cpu=cpu)["raised"]
  monkeypatch.setattr(index_lib, "_SIMD_DONE", True)  # The index must not raise more.
  assert set(levels) <= set(_expected("auto", cpu))
  if not levels:
    pytest.skip(f"{scann_simd.ENV_VAR}={scann_simd.state()['mode']}: no kernel level to compare")
  rng = np.random.default_rng(0)
  x = index_lib.normalize(rng.standard_normal((3000, 64)).astype(np.float32))
  noise = index_lib.normalize(rng.standard_normal((200, 64)).astype(np.float32))
  q = index_lib.normalize(x[:200] + 0.5 * noise)
  tree = index_lib.ScannIndex.build(x, mode="tree_ah", recall_ks=(), num_threads=1)
  brute = index_lib.ScannIndex.build(x, mode="brute_force", recall_ks=())
  results = {}
  for n in range(len(levels) + 1):  # fallback, then each chosen level added in turn
    for level, flag in flags.items():
      flag.value = level in levels[:n]
    results[n] = (tree.search(q, 10), brute.search(q, 10))
  t_slow, b_slow = results[0]
  for n in range(1, len(levels) + 1):
    t_fast, b_fast = results[n]
    np.testing.assert_array_equal(t_fast[0], t_slow[0], err_msg=f"tree-AH with {levels[:n]}")
    np.testing.assert_allclose(t_fast[1], t_slow[1], atol=1e-5)
    np.testing.assert_array_equal(b_fast[0], b_slow[0], err_msg=f"brute force with {levels[:n]}")
    np.testing.assert_allclose(b_fast[1], b_slow[1], atol=1e-5)
