"""Entry point of Bazel's pytest_test targets: runs pytest on the files in argv.

Bazel conventions it honours: the JUnit XML report goes to $XML_OUTPUT_FILE (so Bazel
lists the test cases) and `bazel test --test_filter=EXPR` becomes pytest's `-k EXPR`.
The pytest cache is off because runfiles are not a place to write to.
"""

import os
import sys

import pytest


def main():
  args = ["-q", "-p", "no:cacheprovider", *sys.argv[1:]]
  if os.environ.get("XML_OUTPUT_FILE"):
    args.append("--junitxml=" + os.environ["XML_OUTPUT_FILE"])
  if os.environ.get("TESTBRIDGE_TEST_ONLY"):
    args += ["-k", os.environ["TESTBRIDGE_TEST_ONLY"]]
  return pytest.main(args)


if __name__ == "__main__":
  sys.exit(main())
