"""What every command-line entry point shares.

- `run(main, prog)`: the `__main__` of a job.  It restarts the process once with the malloc
  settings (host_malloc) before anything heavy is imported, parses the flags and calls
  `main(argv)`.  A user error (bad flag value, missing file, mismatched inputs: ValueError,
  OSError and the job's own `errors`) ends the command with one line on stderr,
  `<prog>: error: <message>`, and exit status 1; no traceback, no usage dump.
- `define_flags(ConfigClass)`: one absl flag per field of a job's config dataclass (see
  retro_jax/options.py), and a function that builds the config from the parsed flags.
  Shared settings carry one name in every job (`--db`, `--workdir`, `--output`, ...);
  `aliases` keeps an older name working (`--db_dir` for `--db`).

Heavy modules (JAX, the job's library) are imported by `main`, after the restart.
Every command also takes `--orbax_logs` (orbax-checkpoint's INFO lines are hidden unless
given).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import types
import typing
from typing import Any, Callable, Mapping, Sequence

from absl import app
from absl import flags

from retro_jax import host_malloc
from retro_jax import remote

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)

_ORBAX_LOGS = flags.DEFINE_bool(
    "orbax_logs", False, "Show orbax-checkpoint's INFO lines (dozens per checkpoint); its "
    "warnings and errors are always shown.")


class QuietLibraryInfo:
  """A logging filter that drops the INFO (and DEBUG) records of the named packages, found
  by the source file's path; their warnings and errors pass."""

  def __init__(self, packages=("orbax",)):
    self._parts = tuple(f"{os.sep}{p}{os.sep}" for p in packages)

  def filter(self, record) -> bool:
    import logging  # pylint: disable=g-import-not-at-top
    return record.levelno >= logging.WARNING or not any(
        p in record.pathname for p in self._parts)


def quiet_orbax(enabled: bool = True) -> None:
  """Installs (or removes) the orbax INFO filter on absl's logger, which orbax logs to."""
  import logging  # pylint: disable=g-import-not-at-top
  logger = logging.getLogger("absl")
  for f in [f for f in logger.filters if isinstance(f, QuietLibraryInfo)]:
    logger.removeFilter(f)
  if enabled:
    logger.addFilter(QuietLibraryInfo())


def fail(prog: str, error: BaseException | str) -> typing.NoReturn:
  """Ends the command with the one exit format: `<prog>: error: <message>` (status 1)."""
  message = " ".join(str(error).split()) if not isinstance(error, str) else error
  sys.exit(f"{prog}: error: {message}")


def _loaded(names: Sequence[str]) -> tuple[type[BaseException], ...]:
  """The error classes named "module.Class" whose module is imported (if it is not, none
  of its errors can have been raised, and nothing heavy is imported to find out)."""
  out = []
  for name in names:
    module, _, cls = name.rpartition(".")
    if module in sys.modules:
      out.append(getattr(sys.modules[module], cls))
  return tuple(out)


def config_flag_error(argv: Sequence[str], error: BaseException) -> str:
  """One line for an error ml_collections raised while parsing --config.* flags, naming the
  flag (KeyError/AttributeError carry only the unknown field and a "did you mean")."""
  while (isinstance(error, (KeyError, AttributeError)) and error.args
         and isinstance(error.args[0], BaseException)):
    error = error.args[0]  # AttributeError(KeyError(...)) for a nested field
  if isinstance(error, (KeyError, AttributeError)) and error.args:
    text = str(error.args[0])
    field = text.split("\n", 1)[0].strip("'\"")
    hint = " ".join(text.split("\n")[1:]).strip()
    flag = next((a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")
                 and f".{field}" in a.split("=", 1)[0]), None)
    where = f"{flag}: " if flag else ""
    return (f"{where}no config field {field!r}" + (f" ({hint})" if hint else "") +
            "; the fields are listed in retro_jax/training/train_config.py")
  return " ".join(str(error).split())


def stage_url_flags(argv: list[str], outputs: Sequence[str] = ("output",),
                    flag_values=flags.FLAGS) -> tuple[list[str], list[tuple[str, str]]]:
  """Flags (and positional arguments) whose values are URLs (gs://, memory://: see
  retro_jax/remote.py) are staged to local disk before the job runs: inputs copied in, and
  the flags named in `outputs` given a local path (a copy of what is already there, so a
  rerun resumes), to be copied out when the job ends.  Returns (argv, [(local, url)])."""
  uploads = []
  for name in list(flag_values):
    value = flag_values[name].value
    if isinstance(value, str) and remote.is_url(value):
      if name in outputs:
        local = remote.stage_in(value) if remote.exists(value) else remote.new_local(value)
        uploads.append((local, value))
      else:
        local = remote.stage_in(value)
      flag_values[name].value = local
    elif isinstance(value, list) and any(isinstance(v, str) and remote.is_url(v)
                                         for v in value):
      flag_values[name].value = remote.stage_paths(value)
  argv = [argv[0]] + remote.stage_paths(argv[1:]) if len(argv) > 1 else argv
  return argv, uploads


def run(main: Callable[[list[str]], Any], prog: str, errors: Sequence[str] = (),
        positional: bool = False,
        rewrite_argv: Callable[[list[str]], list[str]] | None = None,
        outputs: Sequence[str] = ("output",)) -> None:
  """Restarts with the malloc settings, parses flags, runs `main`, reports user errors.

  `errors`: the job's own user-facing error classes beyond ValueError and OSError, as
  "module.Class" names (e.g. the retrieval service's).  `positional`: `main` takes
  positional arguments (argv[1:]); otherwise any is refused.  `rewrite_argv`: applied to
  argv before parsing (train: `--config=small` names a packaged config).  `outputs`: the
  flags naming what the job writes (a URL there is written locally, then copied out).
  """
  try:
    host_malloc.tuned_environ(os.environ)  # a misspelt RETRO_JAX_MALLOC, in this format
  except ValueError as e:
    fail(prog, e)
  host_malloc.reexec_with_tuned_malloc()
  _quiet_after_disk_full()

  def parse(argv: list[str]) -> list[str]:
    try:
      if rewrite_argv is not None:
        argv = rewrite_argv(argv)
      return flags.FLAGS(argv)
    except flags.Error as e:
      fail(prog, e)
    except (KeyError, AttributeError, TypeError, ValueError, OSError) as e:
      # ml_collections' config flags raise these for a missing file or a mistyped field.
      fail(prog, config_flag_error(argv, e))

  def guarded(argv: list[str]) -> Any:
    if len(argv) > 1 and not positional:
      fail(prog, f"unexpected arguments: {argv[1:]}")
    quiet_orbax(not _ORBAX_LOGS.value)
    try:
      argv, uploads = stage_url_flags(argv, outputs)
      result = main(argv)
      for local, url in uploads:
        remote.stage_out(local, url)
      return result
    except USER_ERRORS + (app.UsageError,) as e:
      fail(prog, e)
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, _loaded(errors)):
        fail(prog, e)
      raise

  app.run(guarded, flags_parser=parse)


def _disk_full(error: BaseException | None) -> bool:
  fileio = sys.modules.get("retro_jax.fileio")  # imported by every job that writes
  return bool(error is not None and fileio is not None and fileio.is_disk_full(error))


class _DiskFullRecords(logging.Filter):
  """Drops log records whose traceback is a full disk (asyncio's "exception was never
  retrieved", a library thread's error): the command reports it once, in one line."""

  def filter(self, record):
    if record.exc_info and _disk_full(record.exc_info[1]):
      logging.getLogger("retro_jax").debug("disk full: %s", record.getMessage(),
                                           exc_info=record.exc_info)
      return False
    return True


def _quiet_after_disk_full() -> None:
  """A full disk fails every writer at once (checkpoint threads, TensorBoard's writer
  thread, atexit flushes): their tracebacks go to DEBUG, and the command's one line
  `<prog>: error: ... the disk is full ...` stays the only thing printed."""
  for name in ("", "asyncio", "absl"):
    logging.getLogger(name).addFilter(_DiskFullRecords())
  thread_hook, unraisable_hook = threading.excepthook, sys.unraisablehook

  def on_thread_error(args):
    if _disk_full(args.exc_value):
      logging.getLogger("retro_jax").debug("disk full in thread %s", args.thread,
                                           exc_info=(args.exc_type, args.exc_value,
                                                     args.exc_traceback))
      return
    thread_hook(args)

  def on_unraisable(args):
    if _disk_full(args.exc_value):
      return
    unraisable_hook(args)

  excepthook = sys.excepthook

  def on_printed_error(exc_type, value, tb):  # what a C extension's callback prints
    fileio = sys.modules.get("retro_jax.fileio")
    echo = (isinstance(value, RuntimeError) and "Event loop is closed" in str(value)
            and fileio is not None and fileio.disk_full_seen)  # a write's callback after
    if _disk_full(value) or echo:                             # the loop gave up on it
      logging.getLogger("retro_jax").debug("after a full disk", exc_info=(exc_type, value, tb))
      return
    excepthook(exc_type, value, tb)

  threading.excepthook, sys.unraisablehook = on_thread_error, on_unraisable
  sys.excepthook = on_printed_error


# --- Flags from a config dataclass ----------------------------------------------------------

def _plain(tp: Any) -> Any:
  """`int | None` -> int; other types unchanged."""
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1:
      return args[0]
  return tp


def _fields(cls) -> list[tuple[tuple[str, ...], dataclasses.Field, Any]]:
  """(path, field, plain type) of every flag-bearing leaf field; nested configs flattened."""
  hints = typing.get_type_hints(cls)
  out = []
  for f in dataclasses.fields(cls):
    tp = _plain(hints[f.name])
    if dataclasses.is_dataclass(tp):
      out += [((f.name,) + path, g, t) for path, g, t in _fields(tp)]
    elif f.metadata.get("cli", False):
      out.append(((f.name,), f, tp))
  return out


def _flag_name(f: dataclasses.Field) -> str:
  return f.metadata.get("flag") or f.name


def _define(f: dataclasses.Field, tp: Any, flag_values, module_name: str) -> None:
  meta = f.metadata
  name, help_text = _flag_name(f), meta["help"]
  where = dict(flag_values=flag_values, module_name=module_name)
  default = f.default if f.default is not dataclasses.MISSING else None
  choices = meta.get("choices")
  if choices is not None:
    if isinstance(choices, Mapping):
      default = next((k for k, v in choices.items() if v == default), None)
    flags.DEFINE_enum(name, default, list(choices), help_text, **where)
  elif tp is bool:
    flags.DEFINE_bool(name, (not default) if meta.get("negate") else default, help_text,
                      **where)
  elif tp in (int, float, str):
    define = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string}
    define[tp](name, default, help_text, **where)
  elif typing.get_origin(tp) is tuple:
    item = typing.get_args(tp)[0]
    default = None if default is None else [str(v) for v in default]
    if item is str and not meta.get("comma"):  # repeatable: --corpus=a --corpus=b
      flags.DEFINE_multi_string(name, default, help_text, **where)
    else:  # comma list: --ks=1,2,5
      flags.DEFINE_list(name, default, help_text, **where)
  else:
    raise TypeError(f"no flag type for field {f.name}: {tp}")
  if meta.get("required"):
    flags.mark_flag_as_required(name, flag_values=flag_values)


def _value(f: dataclasses.Field, tp: Any, raw: Any) -> Any:
  meta = f.metadata
  choices = meta.get("choices")
  if choices is not None and isinstance(choices, Mapping):
    return choices[raw] if raw is not None else f.default
  if tp is bool and meta.get("negate"):
    return not raw
  if typing.get_origin(tp) is tuple and raw is not None:
    item = typing.get_args(tp)[0]
    try:
      return tuple(item(v) for v in raw)
    except ValueError:
      kind = {int: "integers", float: "numbers"}.get(item, f"{item.__name__} values")
      raise ValueError(f"--{_flag_name(f)} takes {kind}, got {','.join(raw)}") from None
  return raw


def _build(cls, values: Mapping[tuple[str, ...], Any], given: Mapping[str, Any] | None = None):
  kwargs = dict(given or {})
  for f in dataclasses.fields(cls):
    tp = _plain(typing.get_type_hints(cls)[f.name])
    if dataclasses.is_dataclass(tp):
      sub = {p[1:]: v for p, v in values.items() if p[0] == f.name}
      kwargs[f.name] = _build(tp, sub)
    elif (f.name,) in values:
      kwargs[f.name] = values[(f.name,)]
  return cls(**kwargs)


def define_flags(config_cls, *, aliases: Mapping[str, str] | None = None,
                 flag_values=flags.FLAGS) -> Callable[..., Any]:
  """Defines the flags of `config_cls`; returns `(**fields) -> config` from the parsed flags.

  `aliases` maps an old flag name to the current one (`{"db_dir": "db"}`).  The returned
  function takes the top-level fields that have no flag (`cli=False`), e.g. edit_db's
  command word.
  """
  # The flags belong to the CLI module that asks for them, so its --helpshort lists them.
  caller = sys._getframe(1).f_globals.get("__name__")  # pylint: disable=protected-access
  module_name = sys.argv[0] if caller == "__main__" else caller
  leaves = _fields(config_cls)
  for _, f, tp in leaves:
    _define(f, tp, flag_values, module_name)
  for old, new in (aliases or {}).items():
    flags.DEFINE_alias(old, new, flag_values=flag_values, module_name=module_name)

  def config(**given):
    values = {path: _value(f, tp, flag_values[_flag_name(f)].value) for path, f, tp in leaves}
    return _build(config_cls, values, given)

  return config
