"""The Bazel BUILD files cover every module, test and CLI, and their first-party imports.

Why: CI runs only a quick subset under Bazel, so a module without a target (or a target
missing a dependency) would go unnoticed until someone builds it.  This check needs no
Bazel: it evaluates the BUILD files with a tiny Starlark stand-in (BUILD files are
Python-syntax calls) and compares them with the sources.  Fix failures with
`.venv/bin/python tools/bazel/gen_build.py`.
"""

import ast
import fnmatch
import os
import textwrap

import pytest

# Under Bazel this file is a symlink into runfiles; the checkout is where it points.
ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))

PY_RULES = ("py_library", "py_binary", "py_test", "pytest_test")


def eval_build(text, path, package_dir):
  """Returns [(rule kind, attrs)] for the rules a BUILD text declares."""
  rules = []

  def rule(kind):
    def record(**attrs):
      rules.append((kind, attrs))
    return record

  def glob(include, exclude=()):
    found = []
    for dirpath, _, files in os.walk(package_dir):
      for f in files:
        rel = os.path.relpath(os.path.join(dirpath, f), package_dir)
        if any(fnmatch.fnmatch(rel, p) for p in include) and not any(
            fnmatch.fnmatch(rel, p) for p in exclude):
          found.append(rel)
    return sorted(found)

  class Namespace(dict):
    def __missing__(self, key):  # Any other rule or function: recorded, not checked.
      return rule(key)

  ns = Namespace(load=lambda *a, **k: None, glob=glob, select=lambda d: [])
  for kind in PY_RULES:
    ns[kind] = rule(kind)
  exec(compile(text, path, "exec"), {"__builtins__": {}}, ns)  # pylint: disable=exec-used
  return rules


def is_cli(tree):
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and ast.unparse(node.func) == "app.run":
      return True
    if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
        and ast.unparse(node.test).replace("'", '"') == '__name__ == "__main__"'):
      return True
  return False


def first_party_imports(tree, dotted, is_package, modules):
  """Source files (relative paths) of the first-party modules a module imports."""
  pkg = dotted if is_package else dotted.rpartition(".")[0]
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
      names += [base + "." + a.name for a in node.names]
  found = set()
  for name in names:
    if dotted.startswith("tests.") and "tests." + name.split(".")[0] in modules:
      name = "tests." + name  # pytest puts tests/ on sys.path: helpers by bare name.
    parts = name.split(".")
    while parts and ".".join(parts) not in modules:
      parts.pop()
    if parts:
      found.add(modules[".".join(parts)])
  return found


def check(root):
  """Returns a list of problems: sources without targets, imports without deps."""
  # Sources: retro_jax/** (packages only) and tests/*.py, by dotted module name.
  modules = {}
  for dirpath, dirnames, files in os.walk(os.path.join(root, "retro_jax")):
    dirnames[:] = [d for d in dirnames if os.path.exists(os.path.join(dirpath, d, "__init__.py"))]
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, f), root)
        modules[rel[:-3].replace("/", ".").removesuffix(".__init__")] = rel
  tests_dir = os.path.join(root, "tests")
  for f in sorted(os.listdir(tests_dir)) if os.path.isdir(tests_dir) else []:
    if f.endswith(".py"):
      modules["tests." + f[:-3]] = "tests/" + f

  # Targets: every py rule of every BUILD file, with srcs and deps as labels/paths.
  targets = {}  # label -> (kind, set of src paths, list of dep labels, main path)
  for rel in set(os.path.dirname(p) for p in modules.values()):
    build = os.path.join(root, rel, "BUILD")
    if not os.path.exists(build):
      continue
    with open(build, encoding="utf-8") as fh:
      rules = eval_build(fh.read(), build, os.path.join(root, rel))
    for kind, attrs in rules:
      if kind not in PY_RULES:
        continue
      srcs = list(attrs.get("srcs", [])) + ([attrs["src"]] if "src" in attrs else [])
      srcs = {os.path.normpath(os.path.join(rel, s)) for s in srcs if not s.startswith("//")}
      deps = []
      for d in attrs.get("deps", []):
        if d.startswith(":"):
          d = "//%s%s" % (rel, d)
        elif ":" not in d:
          d = "%s:%s" % (d, d.rsplit("/", 1)[-1])
        deps.append(d)
      main = attrs.get("main") or attrs.get("src")
      main = os.path.normpath(os.path.join(rel, main)) if main else None
      targets["//%s:%s" % (rel, attrs["name"])] = (kind, srcs, deps, main)

  problems = []
  owners = {}  # src path -> labels of libraries/tests/binaries that hold it
  for label, (_, srcs, _, _) in targets.items():
    for s in srcs:
      owners.setdefault(s, []).append(label)
  for dotted, rel in sorted(modules.items()):
    with open(os.path.join(root, rel), encoding="utf-8") as fh:
      tree = ast.parse(fh.read(), rel)
    base = os.path.basename(rel)
    holders = owners.get(rel, [])
    if rel.startswith("tests/") and base.startswith("test_"):
      if not any(targets[l][0] in ("py_test", "pytest_test") for l in holders):
        problems.append("test %s has no py_test target" % rel)
        continue
    elif not any(targets[l][0] == "py_library" for l in holders):
      problems.append("module %s has no py_library target" % rel)
      continue
    if is_cli(tree) and not any(targets[l][0] == "py_binary" and targets[l][3] in (rel, None)
                                for l in holders):
      problems.append("CLI %s has no py_binary target" % rel)
    for label in holders:
      _, srcs, deps, _ = targets[label]
      reachable, todo, seen = set(srcs), list(deps), set()
      while todo:  # Bazel puts transitive deps in runfiles, so they count.
        d = todo.pop()
        if d in targets and d not in seen:
          seen.add(d)
          reachable |= targets[d][1]
          todo += targets[d][2]
      missing = first_party_imports(tree, dotted, base == "__init__.py", modules) - reachable
      for m in sorted(missing):
        problems.append("%s (%s) imports %s but no target in its deps holds it"
                        % (label, rel, m))
  for label, (_, _, deps, _) in sorted(targets.items()):
    for d in deps:
      if d not in targets and (d.startswith("//retro_jax") or d.startswith("//tests")):
        problems.append("%s depends on %s, which does not exist" % (label, d))
  return problems


def test_checkout_build_files_cover_everything():
  problems = check(ROOT)
  assert not problems, (
      "BUILD files are behind the sources; run `.venv/bin/python tools/bazel/gen_build.py`:"
      "\n  " + "\n  ".join(problems))


def _write(root, files):
  for rel, text in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


MINI_TREE = {
    "retro_jax/__init__.py": "",
    "retro_jax/config.py": "X = 1\n",
    "retro_jax/train.py": """\
        from absl import app
        from retro_jax import config

        def main(argv):
          del argv

        if __name__ == "__main__":
          app.run(main)
        """,
    "tests/test_config.py": "from retro_jax import config\n",
}

COMPLETE_BUILDS = {
    "retro_jax/BUILD": """\
        py_library(name = "retro_jax", srcs = ["__init__.py"])
        py_library(name = "config", srcs = ["config.py"])
        py_library(name = "train_lib", srcs = ["train.py"], deps = [":config"])
        py_binary(name = "train", srcs = ["train.py"], main = "train.py", deps = [":train_lib"])
        """,
    "tests/BUILD": """\
        load("//tools/bazel:pytest.bzl", "pytest_test")
        pytest_test(name = "test_config", src = "test_config.py", deps = ["//retro_jax:config"])
        test_suite(name = "fast", tests = [":test_config"])
        """,
}


def test_complete_mini_tree_passes(tmp_path):
  _write(tmp_path, {**MINI_TREE, **COMPLETE_BUILDS})
  assert check(str(tmp_path)) == []


@pytest.mark.parametrize("old, new, expected", [
    ('py_library(name = "config", srcs = ["config.py"])\n', "",
     "module retro_jax/config.py has no py_library target"),
    ('py_binary(name = "train", srcs = ["train.py"], main = "train.py", '
     'deps = [":train_lib"])\n', "", "CLI retro_jax/train.py has no py_binary target"),
    ('pytest_test(name = "test_config", src = "test_config.py", '
     'deps = ["//retro_jax:config"])\n', "", "test tests/test_config.py has no py_test target"),
    ('deps = [":config"]', "deps = []",
     "//retro_jax:train_lib (retro_jax/train.py) imports retro_jax/config.py"),
])
def test_missing_target_or_dep_is_reported(tmp_path, old, new, expected):
  builds = dict(COMPLETE_BUILDS)
  for rel, text in builds.items():
    text = textwrap.dedent(text)
    builds[rel] = text.replace(old, new)
  assert builds != {k: textwrap.dedent(v) for k, v in COMPLETE_BUILDS.items()}, "no edit made"
  _write(tmp_path, {**MINI_TREE, **builds})
  problems = check(str(tmp_path))
  assert any(expected in p for p in problems), problems


def test_new_module_without_target_is_reported(tmp_path):
  _write(tmp_path, {**MINI_TREE, **COMPLETE_BUILDS,
                    "retro_jax/model/__init__.py": "",
                    "retro_jax/model/retro.py": "from retro_jax import config\n"})
  problems = check(str(tmp_path))
  assert "module retro_jax/model/__init__.py has no py_library target" in problems
  assert "module retro_jax/model/retro.py has no py_library target" in problems
