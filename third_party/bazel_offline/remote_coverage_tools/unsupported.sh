#!/bin/sh
echo "bazel coverage is not available with --config=offline (stub @remote_coverage_tools)" >&2
exit 1
