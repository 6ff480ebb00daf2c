r"""Edit what a sharded database knows: add documents as a new shard, drop documents.

  python -m retro_jax.edit_db add --db=DB --corpus=NEW_DOCS [--corpus=...] [--name=shard-N]
  python -m retro_jax.edit_db drop --db=DB --doc_key=KEY [--doc_key=...] [--doc_id=3,17]
  python -m retro_jax.edit_db shard --db=WHOLE_DB --output=DB [--how=symlink|move|copy]

`add` builds only the new documents (same tokenizer, chunk size, embedder, index settings
as the shards, read from their manifests) and rewrites DB/shards.json; `drop` lists the
documents in shards.json's dropped_documents; `shard` makes a whole database (build_db's
output) the one shard of a sharded database, which `add` needs.  A running router picks
the edit up by itself (retro_jax/retrieval/serve/router.py).  Details:
retro_jax/retrieval/jobs/edit.py.
"""

import sys

from absl import flags

from retro_jax import _cli

COMMANDS = ("add", "drop", "shard")

_DB = flags.DEFINE_string("db", None, "The sharded database (for shard: the whole one).",
                          required=True)
_CORPUS = flags.DEFINE_multi_string("corpus", None, "add: the new documents (file, "
                                    "directory, glob or .jsonl; repeatable).")
_NAME = flags.DEFINE_string("name", None, "add: the new shard's name (default: the next "
                            "shard-NNNNN).")
_TEXT_FIELD = flags.DEFINE_string("text_field", None, "add: JSON Lines text field (default: "
                                  "the shards').")
_EMBED_DTYPE = flags.DEFINE_string("embed_dtype", None, "add: embedder compute dtype, as the "
                                   "shards were built.")
_DOC_KEY = flags.DEFINE_multi_string("doc_key", None, "drop: a document key (as recorded, or "
                                     "its file name); repeatable.")
_DOC_ID = flags.DEFINE_list("doc_id", None, "drop: global document ids, comma separated.")
_OUTPUT = flags.DEFINE_string("output", None, "shard: the sharded database to create.")
_HOW = flags.DEFINE_enum("how", "symlink", ["symlink", "move", "copy"],
                         "shard: how the whole database becomes shard-00000.")

_COMMAND = []


def main(argv):
  del argv
  command = _COMMAND[0] if _COMMAND else None
  if command not in COMMANDS:
    raise ValueError(f"give a command first: {' | '.join(COMMANDS)} (got "
                     f"{command or 'none'}), e.g. `python -m retro_jax.edit_db add --db=DB "
                     "--corpus=NEW_DOCS`")
  used = {"add": {"corpus", "name", "text_field", "embed_dtype"}, "drop": {"doc_key", "doc_id"},
          "shard": {"output", "how"}}
  for other, names in used.items():
    for name in names - used[command]:
      if flags.FLAGS[name].present:
        raise ValueError(f"--{name} belongs to `edit_db {other}`, not `edit_db {command}`")
  from retro_jax.retrieval.jobs import edit as edit_lib  # pylint: disable=g-import-not-at-top  (after the malloc restart)
  if command == "add":
    if not _CORPUS.value:
      raise ValueError("add needs --corpus=NEW_DOCS (the documents to add)")
    man = edit_lib.add_shard(_DB.value, list(_CORPUS.value), name=_NAME.value,
                            embed_dtype=_EMBED_DTYPE.value, text_field=_TEXT_FIELD.value)
    last = man["shards"][-1]
    print(f"added {last['name']} to {_DB.value}: {last['num_documents']} documents, "
          f"{last['num_chunks']} chunks (ids from {last['chunk_offset']}); now "
          f"{len(man['shards'])} shards, {man['num_chunks']} chunks")
  elif command == "drop":
    try:
      ids = [int(d) for d in (_DOC_ID.value or [])]
    except ValueError:
      raise ValueError(f"--doc_id takes integers, got {','.join(_DOC_ID.value)}") from None
    man, new = edit_lib.drop_documents(_DB.value, _DOC_KEY.value or [], ids)
    print(f"dropped {len(new)} documents {new} of {_DB.value}; "
          f"{len(man['dropped_documents'])} dropped in all")
  else:
    if not _OUTPUT.value:
      raise ValueError("shard needs --output=DB (the sharded database to create)")
    man = edit_lib.shard_whole(_DB.value, _OUTPUT.value, _HOW.value)
    print(f"wrote {_OUTPUT.value}: 1 shard ({_HOW.value} of {_DB.value}), "
          f"{man['num_chunks']} chunks")


if __name__ == "__main__":
  # The command word comes first (`edit_db add --db=...`); absl takes only flags.  (A
  # malloc restart re-runs this with the original command line.)
  if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
    _COMMAND.append(sys.argv.pop(1))
  _cli.run(main, "edit_db")
