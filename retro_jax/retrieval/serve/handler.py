"""Request validation and answering of the retrieval service, with no HTTP (easy to test):
`RetrievalHandler` turns a request body into a `Query`, runs it and builds the answer."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import re
from typing import Any, Sequence

import numpy as np

from retro_jax.retrieval.db import retriever as retriever_lib


ALLOWED_FIELDS = frozenset({"texts", "chunks", "k", "exclude_doc_ids", "return_tokens",
                            "return_texts"})


SEARCH_FIELDS = frozenset({"embeddings", "embeddings_f32", "k", "leaves_to_search",
                           "pre_reorder"})


_INT64_MAX = 2**63 - 1


# A JSON string, escapes included (unrolled: no backtracking).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def _corpus_paths(db) -> list[str]:
  """Every path the manifests of `db` (and of its shards and chunk stores) record."""
  out = []

  def walk(obj, key=""):
    if isinstance(obj, dict):
      for k, v in obj.items():
        walk(v, k)
    elif isinstance(obj, list):
      for v in obj:
        walk(v, key)
    elif isinstance(obj, str) and os.path.isabs(obj) and key in ("paths", "path", "source"):
      out.append(obj.rstrip(os.sep) or os.sep)

  for d in list(getattr(db, "shards", None) or []) + [db]:
    walk(d.manifest)
    walk(getattr(getattr(d, "store", None), "manifest", None) or {})
  return out

class BadRequest(Exception):

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


def _json_floats(x: np.ndarray) -> list:
  """float array -> nested lists with None for inf/nan (JSON has no infinity)."""
  return [[None if not math.isfinite(v) else float(v) for v in row] for row in x.tolist()]


def usable_prefix(text: str, tokenizer, max_length: int, start: int = 2048) -> str:
  """The first of text[:n], n = start, 4 start, ..., whose BERT ids (truncated to max_length,
  as `Embedder.tokenize` truncates) are those of the whole text; else the whole text.

  A prefix is taken only when the last word kept after truncation is complete in it: the
  prefix's first token past the truncation starts another word (or, untruncated, the
  word ends) at least two characters before the cut.  That word and all before it are then
  tokenised as in the whole text, since BERT-style pre-tokenisers split words on a
  character that the prefix and the text share.  Needs a fast (Rust) tokenizer for word
  offsets; a slow one gets the whole text.
  """
  if not getattr(tokenizer, "is_fast", False):
    return text
  capacity = max_length - tokenizer.num_special_tokens_to_add(pair=False)
  n = start
  while n < len(text):
    # The same truncation settings as Embedder.tokenize: the tokenizer's state is shared.
    enc = tokenizer([text[:n]], add_special_tokens=True, truncation=True,
                    max_length=max_length, return_overflowing_tokens=True)
    kept = [w for w in enc.word_ids(0) if w is not None]
    if len(kept) >= capacity:
      if len(enc["input_ids"]) > 1:  # Truncated: the first token cut off.
        i = next((i for i, w in enumerate(enc.word_ids(1)) if w is not None), None)
        if (i is not None and enc.word_ids(1)[i] != kept[-1]
            and enc.token_to_chars(1, i).start <= n - 2):
          return text[:n]
      elif enc.word_to_chars(0, kept[-1]).end <= n - 2:
        return text[:n]
    n *= 4
  return text


@dataclasses.dataclass
class Query:
  """A validated request: n queries, what to run and what to answer."""
  n: int
  k: int
  texts: list[str] | None = None          # free-text queries, or
  tokens: np.ndarray | None = None        # [n, m] int64 LM chunks
  exclude: np.ndarray | None = None       # [n] int64 documents to exclude (-1 none)
  return_tokens: bool = True
  return_texts: bool = False
  bert_ids: list[list[int]] | None = None  # prepared: BERT ids and their pad lengths, or
  pad_lengths: np.ndarray | None = None
  vectors: np.ndarray | None = None        # embeddings made by the request's worker.


class RetrievalHandler:
  """Validates a request body, prepares it, and answers it (no HTTP here, easy to test)."""

  # Whether searches must take the batcher's lock (a local ScaNN searcher: yes; a router's
  # fan-out to shard services, which are their own locks: no).
  search_lock_needed = True

  def __init__(self, retriever, max_batch: int = 256, max_k: int = 100,
               max_search_k: int = 4096):
    self.retriever = retriever
    self.max_batch = max_batch
    self.max_k = max_k
    self.max_search_k = max_search_k
    self._roots = None  # the corpus paths the database records (`public`)
    emb = retriever.embedder
    # Embedders whose forward pass the batcher can share across requests (the BERT one).
    self.batched_embedder = all(hasattr(emb, a) for a in ("tokenize", "pad_lengths",
                                                          "embed_token_ids"))

  def public(self, text: str) -> str:
    """`text` as a client may see it: an absolute path (a document key of a corpus read by
    path, a corpus path in a manifest) made relative to the corpus it came from, never
    naming this machine's directories."""
    if not isinstance(text, str) or not os.path.isabs(text.split(":", 1)[0]):
      return text
    if self._roots is None:
      self._roots = sorted(_corpus_paths(self.retriever.db), key=len, reverse=True)
    for root in self._roots:
      if text == root or text.startswith(root + os.sep) or text.startswith(root + ":"):
        rest = text[len(root):].lstrip(os.sep)
        if text[len(root):].startswith(":") or not rest:  # a file corpus: keep its name
          return os.path.basename(root) + text[len(root):]
        return rest
    return os.path.basename(text)

  def public_manifest(self, manifest: Any) -> Any:
    """A manifest with every absolute path replaced by `public` (GET /manifest)."""
    if isinstance(manifest, dict):
      return {k: self.public_manifest(v) for k, v in manifest.items()}
    if isinstance(manifest, list):
      return [self.public_manifest(v) for v in manifest]
    return self.public(manifest) if isinstance(manifest, str) else manifest

  def parse(self, raw: bytes) -> Query:
    return self.validate(self.parse_json(raw))

  def max_json_values(self) -> int:
    """The most JSON values (numbers, lists, objects; strings are not counted) a valid
    request can hold: a full batch of chunks, or of embeddings for POST /search."""
    width = max(int(self.retriever.chunk_size) + 2, int(self.retriever.db.dim) + 1)
    return self.max_batch * width + 64

  def parse_json(self, raw: bytes) -> Any:
    # A body of small values ("[0,0,0,...": 8 M Python objects for 16 MiB) costs ~20x its
    # size once parsed; its values are counted first, outside strings (bytes.count and a
    # C-speed regex over the strings, nothing copied), and a body with more than a valid
    # request can hold is refused before json.loads builds anything.
    limit = self.max_json_values()
    values = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
    if values > limit and b'"' in raw:  # what lies inside strings does not count
      for n, match in enumerate(_JSON_STRING.finditer(raw)):
        start, end = match.span()
        values -= (raw.count(b",", start, end) + raw.count(b"[", start, end)
                   + raw.count(b"{", start, end)) - 1  # the string is one value
        if n > limit:  # more strings than a request holds: over anyway
          values = max(values, n)
          break
    if values > limit:
      brackets = raw.count(b"[") + raw.count(b"{")
      if brackets > limit and 2 * raw.count(b",") < brackets:  # "[[[[...": depth, not width
        raise BadRequest(400, "malformed JSON: nested too deeply")
      raise BadRequest(413, f"the body holds about {values} JSON values; a request of this "
                       f"service holds at most {limit}")
    try:
      return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
      raise BadRequest(400, f"malformed JSON: the body is not UTF-8 ({e})") from None
    except RecursionError:
      raise BadRequest(400, "malformed JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, or an integer of over 4300 digits.
      raise BadRequest(400, f"malformed JSON: {e}") from None

  def validate(self, body: Any) -> Query:
    if not isinstance(body, dict):
      raise BadRequest(400, "request body must be a JSON object")
    unknown = sorted(set(body) - ALLOWED_FIELDS)
    if unknown:
      raise BadRequest(400, f"unknown field(s) {unknown}; allowed: {sorted(ALLOWED_FIELDS)}")
    has_texts, has_chunks = "texts" in body, "chunks" in body
    if has_texts == has_chunks:
      raise BadRequest(400, "give exactly one of 'texts' or 'chunks'")
    k = body.get("k", None)
    if k is None:
      raise BadRequest(400, "missing field 'k'")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
      raise BadRequest(400, f"'k' must be a positive integer, got {k!r}"[:200])
    if k > self.max_k:
      raise BadRequest(413, f"'k'={k} exceeds this service's limit of {self.max_k}"[:200])
    store = self.retriever.store
    if k > store.num_chunks:
      raise BadRequest(400, f"'k'={k} exceeds the database size ({store.num_chunks} chunks)")
    for flag in ("return_tokens", "return_texts"):
      if flag in body and not isinstance(body[flag], bool):
        raise BadRequest(400, f"'{flag}' must be true or false")
    queries = body["texts"] if has_texts else body["chunks"]
    if not isinstance(queries, list):
      raise BadRequest(400, f"'{'texts' if has_texts else 'chunks'}' must be a list")
    if len(queries) > self.max_batch:
      raise BadRequest(413, f"batch of {len(queries)} queries exceeds this service's limit "
                        f"of {self.max_batch}")
    query = Query(n=len(queries), k=k, return_tokens=body.get("return_tokens", True),
                   return_texts=body.get("return_texts", False))
    if has_texts:
      if "exclude_doc_ids" in body:
        raise BadRequest(400, "'exclude_doc_ids' applies to 'chunks' queries only")
      if not all(isinstance(t, str) for t in queries):
        raise BadRequest(400, "'texts' must be a list of strings")
      for i, t in enumerate(queries):
        if not t.isascii():
          try:
            t.encode("utf-8")
          except UnicodeEncodeError as e:
            raise BadRequest(400, f"texts[{i}] is not valid Unicode: {e.reason} at "
                              f"character {e.start}") from None
      query.texts = queries
      return query
    m = self.retriever.chunk_size
    vocab = self.retriever.tokenizer.vocab_size
    for i, row in enumerate(queries):
      if not isinstance(row, list) or len(row) != m:
        got = len(row) if isinstance(row, list) else type(row).__name__
        raise BadRequest(400, f"chunk {i} must be a list of {m} token ids (the database "
                          f"chunk size), got {got}")
      if not all(isinstance(t, int) and not isinstance(t, bool) for t in row):
        raise BadRequest(400, f"chunk {i} must hold integers only")
      if not all(-1 <= t < vocab for t in row):
        bad = next(t for t in row if not -1 <= t < vocab)
        raise BadRequest(400, f"chunk token ids must lie in [-1, {vocab}), chunk {i} holds "
                          f"{bad}"[:200])
    query.tokens = np.asarray(queries, dtype=np.int64).reshape(len(queries), m)
    exclude = body.get("exclude_doc_ids")
    if exclude is not None:
      if (not isinstance(exclude, list) or len(exclude) != len(queries) or
          not all(isinstance(d, int) and not isinstance(d, bool) for d in exclude)):
        raise BadRequest(400, "'exclude_doc_ids' must be a list of one integer per chunk "
                          "(-1 for none)")
      docs = store.num_documents
      if not all(-1 <= d < docs for d in exclude):
        bad = next(d for d in exclude if not -1 <= d < docs)
        raise BadRequest(400, f"'exclude_doc_ids' must lie in [-1, {docs}), got {bad}"[:200])
      query.exclude = np.asarray(exclude, dtype=np.int64)
    return query

  def prepare(self, query: Query) -> Query:
    """The per-request part of embedding (tokenising; or all of it for other embedders)."""
    if query.n == 0:
      return query
    emb, lm_tok = self.retriever.embedder, self.retriever.tokenizer
    if not self.batched_embedder:
      query.vectors = (emb.embed_texts(query.texts) if query.texts is not None
                       else emb.embed_chunks(query.tokens, lm_tok))
      return query
    if query.texts is not None:
      texts = [usable_prefix(t, emb.tokenizer, emb.max_length) for t in query.texts]
    else:  # As Embedder.embed_chunks does.
      texts = [lm_tok.decode(row) for row in query.tokens]
    query.bert_ids = emb.tokenize(texts)
    query.pad_lengths = emb.pad_lengths(query.bert_ids)
    return query

  def run(self, queries: Sequence[Query]) -> list[retriever_lib.RetrievalResult]:
    """Embeds prepared queries together, then searches each; one result per query."""
    r = self.retriever
    vectors = [q.vectors for q in queries]
    shared = [i for i, q in enumerate(queries) if q.bert_ids is not None]
    if shared:
      ids = [row for i in shared for row in queries[i].bert_ids]
      x = r.embedder.embed_token_ids(
          ids, pad_lengths=np.concatenate([queries[i].pad_lengths for i in shared]))
      for i, part in zip(shared, np.split(x, np.cumsum([queries[i].n for i in shared])[:-1])):
        vectors[i] = part
    results = []
    for q, x in zip(queries, vectors):
      if q.n:  # Searched per request: a batched search can round distances differently.
        results.append(r.search_embeddings(r.db.prepare_queries(x), q.k, q.exclude))
      else:
        m = r.chunk_size
        results.append(retriever_lib.RetrievalResult(
            np.zeros((0, q.k), np.int64), np.zeros((0, q.k), np.float32),
            np.zeros((0, q.k, 2 * m), np.int32)))
    return results

  def answer(self, query: Query, result: retriever_lib.RetrievalResult) -> dict:
    answer = {"ids": result.ids.tolist(), "distances": _json_floats(result.distances)}
    if query.return_tokens:
      answer["tokens"] = result.tokens.tolist()
    if query.return_texts:
      tok = self.retriever.tokenizer
      store = self.retriever.store
      keys = store.doc_keys
      m = store.chunk_size
      answer["texts"] = [[tok.decode(t[:m]) if i >= 0 else None for i, t in zip(ids, toks)]
                         for ids, toks in zip(result.ids, result.tokens)]
      answer["doc_keys"] = [[self.public(keys[int(store.doc_ids[i])]) if i >= 0 else None
                             for i in row] for row in result.ids]
    return answer

  def retrieve(self, body: Any) -> dict:
    """One request body (a parsed JSON value), answered in this thread."""
    query = self.prepare(self.validate(body))
    return self.answer(query, self.run([query])[0])

  def validate_search(self, body: Any) -> tuple[np.ndarray, int, dict]:
    """A POST /search body -> (embeddings [Q, D] float32, k, index search options)."""
    if not isinstance(body, dict):
      raise BadRequest(400, "request body must be a JSON object")
    unknown = sorted(set(body) - SEARCH_FIELDS)
    if unknown:
      raise BadRequest(400, f"unknown field(s) {unknown}; allowed: {sorted(SEARCH_FIELDS)}")
    if ("embeddings" in body) == ("embeddings_f32" in body) or "k" not in body:
      raise BadRequest(400, "give 'embeddings' (a list of vectors) or 'embeddings_f32' "
                        "(base64 float32), and 'k'")
    k = body["k"]
    options = {}
    for name in ("k", "leaves_to_search", "pre_reorder"):
      v = body.get(name)
      if name in body and (type(v) is not int or v < 1):  # pylint: disable=unidiomatic-typecheck
        raise BadRequest(400, f"'{name}' must be a positive integer, got {v!r}"[:200])
      if name != "k" and name in body:
        options[name] = v
    if k > self.max_search_k:
      raise BadRequest(413, f"'k'={k} exceeds this service's search limit of "
                        f"{self.max_search_k}")
    dim = int(self.retriever.db.dim)
    if "embeddings_f32" in body:
      return self._decode_f32(body["embeddings_f32"], dim), k, options
    rows = body["embeddings"]
    if not isinstance(rows, list):
      raise BadRequest(400, "'embeddings' must be a list of vectors")
    if len(rows) > self.max_batch:
      raise BadRequest(413, f"batch of {len(rows)} queries exceeds this service's limit "
                        f"of {self.max_batch}")
    number = (int, float)
    for i, row in enumerate(rows):
      if not isinstance(row, list) or len(row) != dim:
        got = len(row) if isinstance(row, list) else type(row).__name__
        raise BadRequest(400, f"embedding {i} must be a list of {dim} numbers (the index "
                          f"dimension), got {got}")
      if not all(type(v) in number for v in row):
        raise BadRequest(400, f"embedding {i} must hold numbers only")
    try:
      with np.errstate(over="ignore"):
        x = np.asarray(rows, dtype=np.float32).reshape(len(rows), dim)
    except OverflowError:
      x = np.full((1, 1), np.inf, np.float32)
    if not np.isfinite(x).all():
      raise BadRequest(400, "embeddings must be finite (within float32 range)")
    return x, k, options

  def _decode_f32(self, text: Any, dim: int) -> np.ndarray:
    if not isinstance(text, str):
      raise BadRequest(400, "'embeddings_f32' must be a base64 string")
    try:
      raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
      raise BadRequest(400, "'embeddings_f32' is not valid base64") from None
    if len(raw) % (4 * dim):
      raise BadRequest(400, f"'embeddings_f32' holds {len(raw)} bytes, not a whole number of "
                        f"{dim}-dimensional float32 vectors ({4 * dim} bytes each)")
    n = len(raw) // (4 * dim)
    if n > self.max_batch:
      raise BadRequest(413, f"batch of {n} queries exceeds this service's limit of "
                        f"{self.max_batch}")
    x = np.frombuffer(raw, dtype="<f4").reshape(n, dim).astype(np.float32)
    if not np.isfinite(x).all():
      raise BadRequest(400, "embeddings must be finite (within float32 range)")
    return x

  def search(self, x: np.ndarray, k: int, options: dict) -> dict:
    """The index's k nearest of each embedding, in this database's ids."""
    ids, dist = self.retriever.db.index.search(x, k, **options)
    # Which index answered: a router compares it with the one its shard list names, so a
    # service replaced on the same address (another database) is never merged silently.
    index = (self.retriever.db.manifest.get("index") or {}).get("index_id")
    return {"ids": np.asarray(ids).tolist(), "distances": _json_floats(np.asarray(dist)),
            "index_id": index, "num_chunks": int(self.retriever.store.num_chunks)}
