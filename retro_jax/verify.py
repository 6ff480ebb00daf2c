r"""Check a database, a neighbors directory or a training work directory completely.

  python -m retro_jax.verify DB_DIR
  python -m retro_jax.verify NEIGHBORS_DIR [--db=DB_DIR]   (whole or Beam-sharded; DB_DIR
                                                            whole or sharded)
  python -m retro_jax.verify WORKDIR

Detects which kind PATH is, reads every file of it (recorded sha256 hashes, shapes, counts,
manifest cross-references, token ids within the vocabulary, that the index loads, that every
checkpoint step restores) and prints one line per file: `ok   PATH` or `BAD  PATH: reason;
fix`.  Exits 1 if anything is bad.  See retro_jax/integrity.py.
"""

import sys

from absl import flags

from retro_jax import _cli

_DB = flags.DEFINE_string("db", None, "For a neighbors directory: the database it must "
                          "belong to (optional).")


def main(argv):
  if len(argv) != 2:
    raise ValueError("give one PATH: a database, a neighbors directory, a chunk store or a "
                     "training work directory")
  from retro_jax import integrity  # pylint: disable=g-import-not-at-top  (after the malloc restart)
  kind, findings = integrity.check(argv[1], db=_DB.value)
  lines, ok = integrity.report(findings)
  print(f"verify: {argv[1]} is a {kind}")
  for line in lines:
    print(line)
  bad = sum(not f.ok for f in findings)
  print(f"verify: {len(findings) - bad} ok, {bad} bad")
  if not ok:
    sys.exit(1)


if __name__ == "__main__":
  _cli.run(main, "verify", positional=True)
