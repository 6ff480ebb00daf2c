r"""Edit what a sharded database knows: add documents as a new shard, drop documents.

  python -m retro_jax.edit_db add --db=DB --corpus=NEW_DOCS [--corpus=...] [--name=shard-N]
  python -m retro_jax.edit_db drop --db=DB --doc_key=KEY [--doc_key=...] [--doc_id=3,17]
  python -m retro_jax.edit_db shard --db=WHOLE_DB --output=DB [--how=symlink|move|copy]

`add` builds only the new documents (same tokenizer, chunk size, embedder, index settings
as the shards, read from their manifests) and rewrites DB/shards.json; `drop` lists the
documents in shards.json's dropped_documents; `shard` makes a whole database (build_db's
output) the one shard of a sharded database, which `add` needs.  A running router picks
the edit up by itself (retro_jax/retrieval/serve/router.py).  Details:
retro_jax/retrieval/jobs/edit.py; the settings: jobs/edit_config.py.
"""

import sys

from retro_jax import _cli
from retro_jax.retrieval.jobs import edit_config

_CONFIG = _cli.define_flags(edit_config.EditConfig)

_COMMAND = []


def main(argv):
  del argv
  config = _CONFIG(command=_COMMAND[0] if _COMMAND else None)
  from retro_jax.retrieval.jobs import edit as edit_lib  # pylint: disable=g-import-not-at-top  (after the malloc restart)
  print(edit_lib.apply(config))


if __name__ == "__main__":
  # The command word comes first (`edit_db add --db=...`); absl takes only flags.  (A
  # malloc restart re-runs this with the original command line.)
  if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
    _COMMAND.append(sys.argv.pop(1))
  _cli.run(main, "edit_db")
