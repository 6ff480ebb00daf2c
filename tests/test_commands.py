"""The console commands: setup.py's console_scripts, retro_jax/commands.py and the CLI
modules agree, each entry point resolves to a callable, and a command runs its module as
`python -m` does (the malloc restart and the one-line error format included)."""

import ast
import importlib
import importlib.util
import os
import subprocess
import sys

from retro_jax import commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _console_scripts():
  tree = ast.parse(open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read())
  value = next(n.value for n in tree.body if isinstance(n, ast.Assign)
               and ast.unparse(n.targets[0]) == "CONSOLE_SCRIPTS")
  out = {}
  for line in ast.literal_eval(value):
    name, target = (s.strip() for s in line.split("="))
    out[name] = target
  return out


def test_every_entry_point_resolves_to_a_callable_that_runs_an_existing_module():
  scripts = _console_scripts()
  assert set(scripts) == set(commands.COMMANDS)
  for name, target in scripts.items():
    module, func = target.split(":")
    fn = getattr(importlib.import_module(module), func)
    assert callable(fn), target
    assert fn.__doc__ == f"python -m {commands.COMMANDS[name]}"
    assert importlib.util.find_spec(commands.COMMANDS[name]) is not None, name


def test_every_cli_module_has_a_command():
  """A module with a `_cli.run(...)` main block and no console command is a CLI left out."""
  clis = set()
  for d, _, files in os.walk(os.path.join(ROOT, "retro_jax")):
    for f in files:
      if f.endswith(".py"):
        text = open(os.path.join(d, f), encoding="utf-8").read()
        if 'if __name__ == "__main__"' in text and "_cli.run(" in text.split(
            'if __name__ == "__main__"')[-1]:
          rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
          clis.add(rel)
  assert clis and clis <= set(commands.COMMANDS.values()), clis - set(commands.COMMANDS.values())


def test_a_command_runs_its_module_with_the_one_line_error():
  # What the installed `retro-build-db` script does: import the function and call it.
  script = ("import sys; from retro_jax.commands import build_db; "
            "sys.argv[0] = 'retro-build-db'; sys.exit(build_db())")
  proc = subprocess.run([sys.executable, "-c", script, "--corpus=c", "--tokenizer=t",
                         "--output=o", "--chunk_size=abc"], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, check=False,
                        env=dict(os.environ, PYTHONPATH=ROOT))
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1, proc.stderr
  assert len(lines) == 1 and lines[0].startswith("build_db: error: "), proc.stderr
  assert "--chunk_size" in lines[0]
