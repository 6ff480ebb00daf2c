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

from retro_jax import _cli
from retro_jax import verify_config

_CONFIG = _cli.define_flags(verify_config.VerifyConfig)


def main(argv):
  paths = argv[1:]
  config = _CONFIG(path=paths[0] if len(paths) == 1 else None)
  from retro_jax import integrity  # pylint: disable=g-import-not-at-top  (after the malloc restart)
  kind, findings = integrity.check(config.path, db=config.db)
  lines, ok = integrity.report(findings)
  print(f"verify: {config.path} is a {kind}")
  for line in lines:
    print(line)
  bad = sum(not f.ok for f in findings)
  print(f"verify: {len(findings) - bad} ok, {bad} bad")
  if not ok:
    sys.exit(1)


if __name__ == "__main__":
  _cli.run(main, "verify", positional=True)
