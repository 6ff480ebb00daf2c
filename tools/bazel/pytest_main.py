"""Entry point of Bazel's pytest_test targets: runs pytest on the files in argv.

Bazel conventions it honours: the JUnit XML report goes to $XML_OUTPUT_FILE (so Bazel
lists the test cases), `bazel test --test_filter=EXPR` becomes pytest's `-k EXPR`, and
`shard_count = N` on the target splits the collected tests round-robin over N processes
(Bazel runs them in parallel), which is how a slow test file fits CI's time.  The pytest
cache is off because runfiles are not a place to write to.
"""

import os
import sys

import pytest


class _Shard:
  """pytest plugin keeping every total-th collected test, starting at index."""

  def __init__(self, index, total):
    self.index, self.total = index, total

  def pytest_collection_modifyitems(self, config, items):
    keep = [it for i, it in enumerate(items) if i % self.total == self.index]
    config.hook.pytest_deselected(items=[it for it in items if it not in keep])
    items[:] = keep


def main():
  args = ["-q", "-p", "no:cacheprovider", *sys.argv[1:]]
  if os.environ.get("XML_OUTPUT_FILE"):
    args.append("--junitxml=" + os.environ["XML_OUTPUT_FILE"])
  if os.environ.get("TESTBRIDGE_TEST_ONLY"):
    args += ["-k", os.environ["TESTBRIDGE_TEST_ONLY"]]
  plugins = []
  total = int(os.environ.get("TEST_TOTAL_SHARDS", "1"))
  if total > 1:
    if os.environ.get("TEST_SHARD_STATUS_FILE"):  # Tells Bazel sharding is supported.
      open(os.environ["TEST_SHARD_STATUS_FILE"], "w").close()
    plugins.append(_Shard(int(os.environ["TEST_SHARD_INDEX"]), total))
  code = pytest.main(args, plugins=plugins)
  # A shard can legitimately get no tests; pytest calls that exit code 5.
  return 0 if code == pytest.ExitCode.NO_TESTS_COLLECTED and total > 1 else code


if __name__ == "__main__":
  sys.exit(main())
