"""A model-free embedder (signed feature hashing) and `load_embedder`, which picks an
embedder by its source name: "hashing:D" or a BERT checkpoint (embed/embedder.py)."""

from __future__ import annotations

import re
from typing import Sequence
import zlib

import numpy as np

from retro_jax.retrieval.embed import embedder as embedder_lib


_WORD = re.compile(r"\w+")


class HashingEmbedder:
  """A deterministic, model-free embedder: signed feature hashing of words and word pairs.

  Lexical retrieval keys (cosine of hashed word and word-pair counts): the quickstart's
  default on code, where the gain comes from shared text (`--bert=hashing:4096`), and the
  smoke-test embedder of CI (`build_db --bert=hashing:256`).  Same interface as
  `embedder.Embedder`; its neighbors are lexical, not semantic.
  """

  def __init__(self, dim: int = 256):
    if dim < 2:
      raise ValueError(f"hashing embedder dim must be >= 2, got {dim}")
    self.dim = int(dim)

  def identity(self) -> dict:
    return {"kind": "hashing", "dim": self.dim, "version": 1}

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    """Counts read word by word (no list of a text's words and pairs: a 16 MB query text
    costs its lower-cased copy, not ~30x its size); each count is exact in float32 below
    2**24 features, so the order of the additions does not matter."""
    out = np.zeros((len(texts), self.dim), np.float32)
    dim = self.dim
    for i, text in enumerate(texts):
      row = out[i]
      prev = None
      for match in _WORD.finditer(text.lower()):
        word = match.group()
        for feat in (word,) if prev is None else (word, prev + " " + word):
          h = zlib.crc32(feat.encode("utf-8"))
          row[h % dim] += 1.0 if (h >> 31) & 1 else -1.0
        prev = word
    return out

  def embed_chunks(self, tokens, lm_tokenizer) -> np.ndarray:
    return self.embed_texts([lm_tokenizer.decode(row) for row in np.asarray(tokens)])


def load_embedder(source: str | None = None, **kwargs):
  """An embedder by source: "hashing:D" (model-free) or a BERT path/name (None = MiniLM)."""
  if source is not None and str(source).startswith("hashing"):
    _, _, dim = str(source).partition(":")
    if dim and not dim.isdigit():
      raise ValueError(f"embedder {source!r}: the hashing embedder is 'hashing:D' with D an "
                       "integer >= 2 dimensions, e.g. hashing:4096")
    return HashingEmbedder(int(dim) if dim else 256)
  return embedder_lib.Embedder.from_pretrained(source, **kwargs)
