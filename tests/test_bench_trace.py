"""profile_train_step's trace reader: which events of a Perfetto trace count as op time.

On a GPU the trace holds the host's events and the device's, and the device's op line and
its kernel streams describe the same time: counting more than one of them would charge
every op two or three times.  Traces here are small hand-written ones in the Perfetto JSON
layout jax.profiler writes (process/thread metadata events, complete "X" events).
"""

import importlib.util
import os

import pytest

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "experiments", "benchmarks")
pytestmark = pytest.mark.skipif(not os.path.isdir(BENCH_DIR),
                                reason="experiments/benchmarks is not in this sandbox")


@pytest.fixture(scope="module")
def common():
  spec = importlib.util.spec_from_file_location("bench_common",
                                                os.path.join(BENCH_DIR, "common.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _meta(pid, name, tid=None):
  if tid is None:
    return dict(ph="M", pid=pid, name="process_name", args=dict(name=name))
  return dict(ph="M", pid=pid, tid=tid, name="thread_name", args=dict(name=name))


def _x(pid, tid, name, dur, **args):
  return dict(ph="X", pid=pid, tid=tid, name=name, ts=0, dur=dur, args=args)


def test_cpu_trace_keeps_thunks_and_drops_program_and_python_events(common):
  events = [
      _meta(1, "/host:CPU"), _meta(1, "tf_XLAEigen/1", tid=7),
      _x(1, 7, "fusion.3", 10), _x(1, 7, "dot.1", 5),
      _x(1, 7, "PjitFunction(step)", 100), _x(1, 7, "jit_step", 90),
      _x(1, 7, "$profile_train_step.py:10 main", 80), _x(1, 7, "Thunk::Execute", 70),
      dict(ph="i", pid=1, tid=7, name="fusion.9", ts=0),        # an instant: no duration
  ]
  got = list(common.trace_op_events(dict(traceEvents=events)))
  assert got == [("fusion.3", 10, "fusion.3"), ("dot.1", 5, "dot.1")]


def test_gpu_trace_counts_only_the_device_op_line(common):
  events = [
      _meta(1, "/host:CPU"), _meta(1, "python", tid=1),
      _meta(2, "/device:GPU:0"), _meta(2, "XLA Ops", tid=10), _meta(2, "Stream #1", tid=11),
      _meta(2, "XLA Modules", tid=12),
      _x(1, 1, "fusion.3", 999),                        # host-side launch: not device time
      _x(2, 10, "fusion.3", 40, hlo_op="fusion.3"),
      _x(2, 10, "custom-call.7", 60, hlo_op="custom-call.7"),
      _x(2, 11, "loop_add_fusion", 40, hlo_op="fusion.3"),   # the same time, kernel view
      _x(2, 12, "jit_step", 100),
  ]
  got = list(common.trace_op_events(events))
  assert got == [("fusion.3", 40, "fusion.3"), ("custom-call.7", 60, "custom-call.7")]
  assert sum(d for _, d, _ in got) == 100   # = the module's time, nothing double-counted


def test_gpu_trace_without_op_line_counts_kernels_charged_to_their_hlo_op(common):
  events = [
      _meta(2, "/device:GPU:0"), _meta(2, "Stream #1(Compute)", tid=11),
      _meta(2, "XLA Modules", tid=12), _meta(2, "Steps", tid=13),
      _x(2, 11, "nvjet_hsh_128x256", 30, hlo_op="custom-call.7"),
      _x(2, 11, "loop_add_fusion", 12, long_name="fusion.3 = f32[8] add(...)"),
      _x(2, 11, "memcpy", 2),
      _x(2, 12, "jit_step", 44), _x(2, 13, "0", 44),
  ]
  got = list(common.trace_op_events(events))
  assert got == [("nvjet_hsh_128x256", 30, "custom-call.7"),
                 ("loop_add_fusion", 12, "fusion.3"), ("memcpy", 2, "memcpy")]
