"""Test-wide settings, applied before JAX initialises its backend.

Most of this suite's time is XLA:CPU compiling tiny programs (threefry alone is ~1 s per
random call at the default LLVM optimisation level).  Tests run tiny shapes once, so a
cheaper backend optimisation level roughly halves their wall time without changing what
they check; numerics stay IEEE float32 (equivalence tests compare within tolerances, and
bitwise tests compare two runs under the same flags).  A user-set XLA_FLAGS wins.
"""

import os

os.environ.setdefault(
    "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
