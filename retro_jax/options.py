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
import shlex
from typing import Any, Mapping, Sequence

# The Apache Beam runners an offline job (build_db, precompute_neighbors) can run on; unset
# runs the job in this process.
BEAM_RUNNERS = ("DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner",
                "PortableRunner")


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


class SourceError(ConfigError):
  """Unusable evaluation/generation input (empty corpus, missing tokenizer, ...)."""


def paths(value) -> tuple:
  """A path option given as one string, a list or None, as a tuple (None: empty)."""
  if value is None:
    return ()
  return (value,) if isinstance(value, str) else tuple(value)


def beam_argv(runner: str | None, beam_options: str | None, error=ConfigError) -> list[str]:
  """`--runner=R` plus the words of `beam_options` (Beam's own pipeline flags), checked for
  form only: a known runner, options given only with one, each word a `--flag[=value]`
  (or the value after one).  Beam itself checks the names and values (beam_pipelines.py)."""
  if runner is None:
    if beam_options:
      raise error(f"beam_options {beam_options!r} need a runner (e.g. --runner=DirectRunner)")
    return []
  if runner not in BEAM_RUNNERS:
    raise error(f"runner must be one of {', '.join(BEAM_RUNNERS)} (or unset: in-process), "
                f"got {runner!r}")
  try:
    words = shlex.split(beam_options or "")
  except ValueError as e:
    raise error(f"beam_options {beam_options!r} do not parse as shell words: {e}") from None
  if words and not words[0].startswith("--"):
    raise error(f"beam_options must be Beam pipeline flags like --direct_num_workers=2, got "
                f"{words[0]!r}")
  for word in words:
    if word.split("=", 1)[0] in ("--runner", "--runner_name"):
      raise error(f"give the runner with --runner, not inside beam_options ({word!r})")
  return [f"--runner={runner}"] + words
