"""Fields of a job's config dataclass that also describe their command-line flag.

A job (build a database, precompute neighbors, evaluate, generate) is configured by one
frozen dataclass whose fields hold every default once; `retro_jax._cli.define_flags` derives
the absl flags from the fields.  `option(...)` is `dataclasses.field` plus what the flag
needs: its help text and, where it differs from the field, its name, its choices or its
sense.  Nested config dataclasses (e.g. a build's `IndexOptions`) give flags too, under
their own field names.  Pure Python.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence


def option(default: Any = None, help: str = "", *,  # pylint: disable=redefined-builtin
           flag: str | None = None, choices: Sequence[str] | Mapping[str, Any] | None = None,
           required: bool = False, negate: bool = False, comma: bool = False,
           cli: bool = True) -> Any:
  """A config field with its flag.

  Args:
    default: the one default of this setting.
    help: the flag's help text (and the field's documentation).
    flag: the flag's name when it is not the field's.
    choices: the allowed values (an enum flag); a mapping gives the field value of each
      flag value, e.g. {"auto": None, "true": True, "false": False}.
    required: the flag must be given (the field then has no meaningful default).
    negate: a bool flag that sets the opposite of the field (`--ignore_eos` -> stop_at_eos).
    comma: a tuple of strings given as one comma-separated flag (`--suffixes=.py,.txt`)
      rather than a repeated one (`--corpus=a --corpus=b`).
    cli: False for a setting only library callers choose (no flag).
  """
  return dataclasses.field(default=default, metadata={
      "help": help, "flag": flag, "choices": choices, "required": required,
      "negate": negate, "comma": comma, "cli": cli})


class ConfigError(ValueError):
  """A job config with an unusable value; the message names the setting."""
