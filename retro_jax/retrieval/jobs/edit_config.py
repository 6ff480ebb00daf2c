"""The configuration of a database edit (`python -m retro_jax.edit_db add|drop|shard`).

Every default once; the command's flags are derived from these fields (retro_jax/_cli.py),
the command word (`add`, `drop`, `shard`) is the field without a flag.  Each command takes
its own fields (`USED`); one of another command's is refused, naming the command it belongs
to.  Pure Python (no JAX), so the command line is checked before anything heavy is imported.
The edits themselves: edit.py.
"""

from __future__ import annotations

import dataclasses

from retro_jax.options import ConfigError
from retro_jax.options import option

COMMANDS = ("add", "drop", "shard")
HOWS = ("symlink", "move", "copy")
# The fields of each command (`db` is every command's).
USED = {"add": ("corpus", "name", "text_field", "embed_dtype"),
        "drop": ("doc_key", "doc_id"),
        "shard": ("output", "how")}
EXAMPLE = "python -m retro_jax.edit_db add --db=DB --corpus=NEW_DOCS"


class EditConfigError(ConfigError):
  """A bad edit_db command line; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class EditConfig:
  """One edit of a sharded database."""
  command: str | None = option(None, "add | drop | shard (the word before the flags).",
                               cli=False)
  db: str = option(None, "The sharded database (for shard: the whole one).", required=True)
  corpus: tuple[str, ...] = option(None, "add: the new documents (file, directory, glob or "
                                   ".jsonl; repeatable).")
  name: str | None = option(None, "add: the new shard's name (default: the next "
                            "shard-NNNNN).")
  text_field: str | None = option(None, "add: JSON Lines text field (default: the shards').")
  embed_dtype: str | None = option(None, "add: embedder compute dtype, as the shards were "
                                   "built.")
  doc_key: tuple[str, ...] = option(None, "drop: a document key (as recorded, or its file "
                                    "name); repeatable.")
  doc_id: tuple[int, ...] = option(None, "drop: global document ids, comma separated.")
  output: str | None = option(None, "shard: the sharded database to create.")
  how: str = option("symlink", "shard: how the whole database becomes shard-00000.",
                    choices=HOWS)

  def __post_init__(self):
    for name in ("corpus", "doc_key", "doc_id"):  # None (no flag) or one value: a tuple
      value = getattr(self, name)
      if value is None:
        value = ()
      elif isinstance(value, (str, int)):
        value = (value,)
      object.__setattr__(self, name, tuple(value))
    self.validate()

  def given(self, name: str) -> bool:
    """Whether field `name` was set (differs from its default)."""
    value = getattr(self, name)
    default = next(f.default for f in dataclasses.fields(self) if f.name == name)
    return value not in (None, ()) and value != default

  def validate(self) -> None:
    if self.command not in COMMANDS:
      raise EditConfigError(f"give a command first: {' | '.join(COMMANDS)} (got "
                            f"{self.command or 'none'}), e.g. `{EXAMPLE}`")
    if not self.db:
      raise EditConfigError("db is required: --db=DB names the database to edit")
    for other, names in USED.items():
      for name in names:
        if other != self.command and self.given(name):
          raise EditConfigError(f"--{name} belongs to `edit_db {other}`, not "
                                f"`edit_db {self.command}`")
    if self.how not in HOWS:
      raise EditConfigError(f"--how must be one of {list(HOWS)}, got {self.how!r}")
    if self.command == "add" and not self.corpus:
      raise EditConfigError("add needs --corpus=NEW_DOCS (the documents to add)")
    if self.command == "drop":
      if not self.doc_key and not self.doc_id:
        raise EditConfigError("drop needs the documents to drop: --doc_key=KEY (repeatable) "
                              "or --doc_id=N,...")
      negative = [i for i in self.doc_id if i < 0]
      if negative:
        raise EditConfigError(f"--doc_id takes document ids >= 0, got {negative}")
    if self.command == "shard" and not self.output:
      raise EditConfigError("shard needs --output=DB (the sharded database to create)")
