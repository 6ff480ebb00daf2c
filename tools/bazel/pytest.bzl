"""`pytest_test`: a py_test that runs one pytest file.

A plain py_test executes the test file as a script, and a pytest module has no main: it
would "pass" without running a single test.  This macro runs the file through
//tools/bazel:pytest_main.py instead, so `bazel test` and `pytest` run the same tests.
"""

def pytest_test(name, src, deps = [], args = [], **kwargs):
    native.py_test(
        name = name,
        srcs = [src, "//tools/bazel:pytest_main.py"],
        main = "//tools/bazel:pytest_main.py",
        args = ["$(rootpath %s)" % src] + args,
        python_version = "PY3",
        deps = deps,
        **kwargs
    )
