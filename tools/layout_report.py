"""Prints figures on the layout of retro_jax, so a restructuring can be judged before and after.

  .venv/bin/python tools/layout_report.py            # the report for this checkout
  .venv/bin/python tools/layout_report.py --root DIR # for another checkout

What it counts (by reading the sources with `ast`; nothing is imported):
- lines and .py files per folder of retro_jax/ (each folder counts its own files only);
- inside retro_jax/retrieval/: modules, import arrows between them (distinct module -> module
  pairs, imports inside functions included), import levels (the longest chain of arrows + 1;
  a module that imports nothing of retrieval/ is on level 1), and the same for its subfolders
  taken as one node each when it has any;
- the longest `main` of a command (a module calling `app.run(` or guarded by `__main__`);
- functions (and methods) longer than 60 lines, in all of retro_jax/;
- database-opening entry points: public functions and class methods named `open` or `open_*`
  under retro_jax/retrieval/, outside the HTTP layer (the service, router and serve modules
  or folder);
- identity-check functions: functions named `check*`/`_check*` outside fileio.py (which
  holds the comparison primitives) and integrity.py (content checks of files on disk) that
  compare recorded identities: they call `check_equal`, `check_identity`, `check_tokenizer`,
  `check_chunk_size` or `check_vocab`, or are one of the latter three.
"""

from __future__ import annotations

import argparse
import ast
import collections
import os

PRIMITIVES = {"check_equal", "check_identity", "check_tokenizer", "check_chunk_size", "check_vocab"}


def _py_files(root: str):
  for d, dirs, files in os.walk(os.path.join(root, "retro_jax")):
    dirs[:] = sorted(x for x in dirs if not x.startswith((".", "__pycache__")))
    for f in sorted(files):
      if f.endswith(".py"):
        yield os.path.join(d, f)


def _module(root: str, path: str) -> str:
  rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
  """The first-party modules (or packages) a module imports."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.startswith("retro_jax"))
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = module.split(".")
        parts = parts if is_package else parts[:-1]
        parts = parts[:len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      if not base.startswith("retro_jax"):
        continue
      for a in node.names:
        out.add(f"{base}.{a.name}")
  return out


def _resolve(name: str, modules: set[str]) -> str | None:
  while name:
    if name in modules:
      return name
    name = name.rpartition(".")[0]
  return None


def _levels(nodes: set[str], arrows: set[tuple[str, str]]) -> int:
  deps = collections.defaultdict(set)
  for a, b in arrows:
    deps[a].add(b)
  memo: dict[str, int] = {}

  def level(n, stack=()):
    if n in memo:
      return memo[n]
    if n in stack:  # a cycle: count it once
      return 0
    memo[n] = 1 + max((level(d, stack + (n,)) for d in deps[n]), default=0)
    return memo[n]

  return max((level(n) for n in nodes), default=0)


def _is_cli(src: str) -> bool:
  return "app.run(" in src or '__name__ == "__main__"' in src


def report(root: str) -> str:
  lines_per, files_per = collections.Counter(), collections.Counter()
  trees, srcs = {}, {}
  for path in _py_files(root):
    with open(path, encoding="utf-8") as f:
      src = f.read()
    folder = os.path.relpath(os.path.dirname(path), root)
    lines_per[folder] += src.count("\n")
    files_per[folder] += 1
    trees[path], srcs[path] = ast.parse(src, path), src
  out = ["lines and files per folder:"]
  for folder in sorted(lines_per):
    out.append(f"  {folder + '/':38s} {lines_per[folder]:6d} lines {files_per[folder]:4d} files")
  out.append(f"  {'retro_jax/ (all)':38s} {sum(lines_per.values()):6d} lines "
             f"{sum(files_per.values()):4d} files")

  # Import graph inside retrieval/.
  modules = {_module(root, p): p for p in trees}
  names = set(modules)
  ret = "retro_jax.retrieval"
  ret_mods = {m for m, p in modules.items()
              if m.startswith(ret + ".") and not p.endswith("__init__.py")}
  arrows = set()
  for m in ret_mods:
    p = modules[m]
    for imp in _imports(trees[p], m, False):
      target = _resolve(imp, names)
      if target in ret_mods and target != m:
        arrows.add((m, target))
  out.append(f"inside retrieval/: {len(ret_mods)} modules, {len(arrows)} import arrows, "
             f"{_levels(ret_mods, arrows)} import levels")
  folders = {m: ".".join(m.split(".")[:3]) for m in ret_mods}
  subs = {f for f in folders.values() if any(modules[m].endswith("__init__.py") or
                                               m.count(".") > 2 for m in ret_mods
                                               if folders[m] == f)}
  if any(m.count(".") > 2 for m in ret_mods):
    fnodes = set(folders.values())
    farrows = {(folders[a], folders[b]) for a, b in arrows if folders[a] != folders[b]}
    out.append(f"  as folders: {len(subs)} subfolders + {len(fnodes - subs)} loose modules, "
               f"{len(farrows)} arrows between them, {_levels(fnodes, farrows)} levels")
    for a, b in sorted(farrows):
      out.append(f"    {a[len(ret) + 1:]} -> {b[len(ret) + 1:]}")

  # Longest command main, long functions, open entry points, identity checks.
  mains, longs, opens, checks = [], [], [], []
  for path, tree in trees.items():
    rel = os.path.relpath(path, root)
    http = any(k in rel for k in ("service", "router", "/serve"))
    opener_scope = rel.startswith("retro_jax/retrieval/")
    skip_checks = rel in ("retro_jax/fileio.py", "retro_jax/integrity.py")
    for node in ast.walk(tree):
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      n = node.end_lineno - node.lineno + 1
      if n > 60:
        longs.append((n, f"{rel}:{node.lineno} {node.name}"))
      if node.name == "main" and _is_cli(srcs[path]) and node in tree.body:
        mains.append((n, rel))
    for parent in [tree] + [c for c in tree.body if isinstance(c, ast.ClassDef)]:
      for node in parent.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
          continue
        qual = node.name if parent is tree else f"{parent.name}.{node.name}"
        if opener_scope and not http and (node.name == "open" or node.name.startswith("open_")):
          opens.append(f"{rel}:{node.lineno} {qual}")
        if skip_checks or not node.name.lstrip("_").startswith("check"):
          continue
        called = {c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", "")
                  for c in ast.walk(node) if isinstance(c, ast.Call)}
        if node.name in PRIMITIVES or called & PRIMITIVES:
          checks.append(f"{rel}:{node.lineno} {qual}")
  mains.sort(reverse=True)
  out.append(f"longest command main: {mains[0][0]} lines ({mains[0][1]}); "
             f"{len(mains)} commands")
  longs.sort(reverse=True)
  out.append(f"functions over 60 lines: {len(longs)}")
  out.extend(f"  {n:4d} {where}" for n, where in longs)
  out.append(f"database-opening entry points: {len(opens)}")
  out.extend(f"  {o}" for o in sorted(opens))
  check_modules = {c.split(":")[0] for c in checks}
  outside = [c for c in checks if not c.startswith("retro_jax/provenance.py")]
  out.append(f"identity-check functions: {len(checks)} in {len(check_modules)} modules "
             f"({len(outside)} outside retro_jax/provenance.py, in "
             f"{len({c.split(':')[0] for c in outside})} modules)")
  out.extend(f"  {c}" for c in sorted(checks))
  return "\n".join(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  print(report(parser.parse_args().root))


if __name__ == "__main__":
  main()
