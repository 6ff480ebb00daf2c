"""Training configs installed with the package, found by name or by path.

  retro-train --config=small ...                        # a packaged config, by name
  retro-train --config=retro_jax/configs/small.py ...   # the same file, from anywhere
  retro-train --config=my_config.py ...                 # your own file (call default_config())

| name | what |
|---|---|
| quickstart / quickstart_baseline | the recipe that learns to read neighbors on a CPU budget (preset `quickstart`: aligned, filtered neighbors, copy head, CCA gate; precompute 10 neighbors) and its same-size baseline |
| small / small_baseline | the `small` preset with the paper's reading (m = 32), and its baseline |
| tiny | test-sized |
| retro_172m, retro_425m, retro_1_5b, retro_7_5b | paper sizes (App. C.1 recipe, bf16 + remat, multi-host) |

The user-facing configs (quickstart*, small*) set `model_from_data=True`: the model's chunk
size and vocabulary come from the database's chunk store and its tokenizer unless given
(`--config.model.chunk_size=M`, `--config.model.vocab_size=V`).
"""

from __future__ import annotations

import os

DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
  """The packaged configs' names (file names without .py)."""
  return sorted(f[:-3] for f in os.listdir(DIRECTORY)
                if f.endswith(".py") and not f.startswith("_"))


def resolve(value: str) -> str:
  """A --config value -> the file to load.

  An existing file is taken as given; otherwise a packaged config's name (`small`), its
  file name (`small.py`) or its path as in the repository (`retro_jax/configs/small.py`)
  gives the installed file.  Anything else raises ValueError listing the names.
  A `:ARG` suffix (ml_collections' config argument) is kept.
  """
  path, sep, arg = value.partition(":")
  if not path or os.path.isfile(path):
    return value
  base = os.path.basename(path)
  name = base[:-3] if base.endswith(".py") else base
  packaged = os.path.join(DIRECTORY, name + ".py")
  under_package = os.path.normpath(path).replace(os.sep, "/").startswith("retro_jax/configs/")
  if name in names() and ("/" not in path or under_package):
    return packaged + sep + arg
  raise ValueError(f"--config={value}: no such file, and not a packaged config; give a "
                   f"path to a config .py file or one of: {', '.join(names())}")


def rewrite_argv(argv: list[str]) -> list[str]:
  """argv with every --config=VALUE (or --config VALUE) resolved (see `resolve`)."""
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      out[i] = "--config=" + resolve(a[len("--config="):])
    elif a == "--config" and i + 1 < len(out):
      out[i + 1] = resolve(out[i + 1])
  return out
