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

from absl import flags
import numpy as np

from retro_jax import _cli
from retro_jax.retrieval.db import access
from retro_jax.retrieval.db import retriever as retriever_lib
from retro_jax.retrieval.store import neighbors as neighbors_lib

_DB = flags.DEFINE_string("db", None, "Database directory.", required=True)
_CHUNK = flags.DEFINE_integer("chunk_id", None, "Database chunk to inspect.")
_TEXT = flags.DEFINE_string("text", None, "Free text to use as the query.")
_K = flags.DEFINE_integer("k", 4, "Neighbors to show.")
_NEIGHBORS = flags.DEFINE_string("neighbors", None, "Show this precomputed neighbors file "
                                 "(query store = the database) instead of searching.")
_EXCLUDE = flags.DEFINE_bool("exclude_same_document", True, "For --chunk_id: drop neighbors "
                             "from the chunk's own document.")
_WIDTH = flags.DEFINE_integer("width", 100, "Wrap text at this width (0 = no wrapping).")


def _show(text: str, indent: str = "    ") -> str:
  text = text.replace("\t", "  ")
  if _WIDTH.value > 0:
    lines = []
    for line in text.splitlines() or [""]:
      lines.extend(textwrap.wrap(line, _WIDTH.value, replace_whitespace=False,
                                 drop_whitespace=False) or [""])
    text = "\n".join(lines)
  return textwrap.indent(text, indent, lambda _: True)


def show(db_dir: str, chunk_id: int | None = None, text: str | None = None, k: int = 4,
            neighbors_dir: str | None = None, exclude_same_document: bool = True) -> str:
  """Returns the report as a string (the CLI prints it)."""
  if (chunk_id is None) == (text is None):
    raise ValueError("give exactly one of --chunk_id or --text")
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
    out.append(_show(tok.decode(np.asarray(store.tokens[chunk_id]))))
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
    out.append(_show(text))
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
    out.append(_show(tok.decode(tokens[rank][:m])))
    cont = tokens[rank][m:]
    out.append("  F:" + ("" if (cont >= 0).any() else " (document ends)"))
    if (cont >= 0).any():
      out.append(_show(tok.decode(cont)))
  return "\n".join(out)


def main(argv):
  del argv
  print(show(_DB.value, _CHUNK.value, _TEXT.value, _K.value, _NEIGHBORS.value,
             _EXCLUDE.value))


if __name__ == "__main__":
  _cli.run(main, "show_neighbors")
