r"""Prints a chunk (or a piece of text) and its retrieved neighbors as text.

    python -m retro_jax.show_neighbors --db=DB_DIR --chunk_id=1234 [--k=4]
    python -m retro_jax.show_neighbors --db=DB_DIR --text="def parse_args(" [--k=4]
    python -m retro_jax.show_neighbors --db=DB_DIR --chunk_id=1234 --neighbors=NB_DIR

With --chunk_id the query is that database chunk and neighbors from its own document are
excluded (as in training; --noexclude_same_document to see them); with --neighbors the
precomputed neighbors file is shown instead of a live search, so you read exactly what the
model will read.  Each neighbor is shown as its chunk N, then its continuation F, with the
distance (smaller is nearer) and the key of the document it comes from.  --url queries a
running service instead of loading the database.  An interactive tool: the database is
memory-mapped and its manifests checked, not hashed whole (`python -m retro_jax.verify`).
"""

from __future__ import annotations

import textwrap

from retro_jax import _cli
from retro_jax.retrieval.db.show_config import ShowNeighborsConfig

_CONFIG = _cli.define_flags(ShowNeighborsConfig)


def _show(text: str, width: int, indent: str = "    ") -> str:
  text = text.replace("\t", "  ")
  if width > 0:
    lines = []
    for line in text.splitlines() or [""]:
      lines.extend(textwrap.wrap(line, width, replace_whitespace=False,
                                 drop_whitespace=False) or [""])
    text = "\n".join(lines)
  return textwrap.indent(text, indent, lambda _: True)


def show(db_dir: str, **settings) -> str:
  """The report (the CLI prints it) of `ShowNeighborsConfig(db=db_dir, **settings)`."""
  return report(ShowNeighborsConfig(db=db_dir, **settings))


def report(config: ShowNeighborsConfig) -> str:
  """The query of `config` and its neighbors, as text."""
  # pylint: disable=g-import-not-at-top  (the command imports these after the malloc restart)
  import numpy as np
  from retro_jax.retrieval.db import access
  from retro_jax.retrieval.db import retriever as retriever_lib
  from retro_jax.retrieval.store import neighbors as neighbors_lib
  # pylint: enable=g-import-not-at-top
  db_dir, chunk_id, text, k = config.db, config.chunk_id, config.text, config.k
  neighbors_dir, exclude_same_document = config.neighbors_dir, config.exclude_same_document
  wrap = lambda t: _show(t, config.width)  # pylint: disable=unnecessary-lambda-assignment
  db = access.open_database(db_dir)
  store, m = db.store, db.chunk_size
  tok = db.tokenizer
  keys = store.doc_keys
  out = []
  if chunk_id is not None:
    if not 0 <= chunk_id < store.num_chunks:
      raise ValueError(f"--chunk_id={chunk_id} is outside the database [0, {store.num_chunks})")
    doc = int(store.doc_ids[chunk_id])
    out.append(f"QUERY chunk {chunk_id} (document {doc}: {keys[doc]})")
    out.append(wrap(tok.decode(np.asarray(store.tokens[chunk_id]))))
    if neighbors_dir:
      nb = neighbors_lib.load_neighbors(neighbors_dir, expected_db_manifest=db.manifest,
                                         expected_query_manifest=store.manifest)
      ids = np.asarray(nb.ids[chunk_id:chunk_id + 1, :k])
      dist = np.asarray(nb.distances[chunk_id:chunk_id + 1, :k])
      source = f"precomputed neighbors {neighbors_dir}"
    else:
      emb = np.asarray(db.embeddings[chunk_id:chunk_id + 1], np.float32)
      r = retriever_lib.Retriever(db, embedder=None)
      res = r.search_embeddings(emb, k, exclude_doc_ids=[doc] if exclude_same_document
                                else None)
      ids, dist = res.ids, res.distances
      source = "live search" + (", own document excluded" if exclude_same_document else "")
  else:
    out.append("QUERY text")
    out.append(wrap(text))
    r = retriever_lib.Retriever(db)
    res = r.retrieve_texts([text], k)
    ids, dist = res.ids, res.distances
    source = "live search"
  out.append(f"\nNEIGHBORS ({source}; distance: smaller is nearer)")
  tokens = store.neighbor_tokens(ids)[0]
  for rank, (i, d) in enumerate(zip(ids[0], dist[0])):
    if i < 0:
      out.append(f"[{rank}] (none: fewer than k candidates left)")
      continue
    doc = int(store.doc_ids[i])
    out.append(f"[{rank}] chunk {int(i)}  distance {float(d):.4f}  document {doc}: {keys[doc]}")
    out.append("  N:")
    out.append(wrap(tok.decode(tokens[rank][:m])))
    cont = tokens[rank][m:]
    out.append("  F:" + ("" if (cont >= 0).any() else " (document ends)"))
    if (cont >= 0).any():
      out.append(wrap(tok.decode(cont)))
  return "\n".join(out)


def main(argv):
  del argv
  print(report(_CONFIG()))


if __name__ == "__main__":
  _cli.run(main, "show_neighbors")
