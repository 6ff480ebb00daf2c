r"""Builds a retrieval database: corpus -> chunk store -> embeddings -> ScaNN index.

`build(BuildConfig)` is what `python -m retro_jax.build_db` calls; the settings and their
defaults are in jobs/build_config.py.

Steps, each resumable (a rerun skips what is finished and complete):
  1. DB_DIR/chunks: the chunk store (`chunk_store.build_chunk_store`, atomic).
  2. DB_DIR/embeddings.npy [C, D]: BERT mean-pooled embeddings of every chunk (detokenised
     and re-tokenised by `Embedder.embed_chunks`), unit-normalised for dot_product.  Computed
     in shards of `shard_size` chunks, each written atomically to
     DB_DIR/embeddings.parts/ and skipped on restart; the shards are then assembled into
     embeddings.npy and removed.  DB_DIR/embeddings.json records what they were made from.
  3. DB_DIR/index: ScaNN searcher + manifest with settings and measured recall@2/@10 vs
     exact search (see index.py for the auto settings).
  4. DB_DIR/tokenizer/: a copy of the LM tokenizer file (the DB is self-contained).
  5. DB_DIR/manifest.json: written last; its presence means the database is complete.
One searcher holds the whole index in RAM (about 4*D + D/2 bytes per chunk for tree_ah);
past that, `--runner=DirectRunner|DataflowRunner|... --num_shards=S` builds a sharded
database (beam_pipelines.py: these same steps per shard, `build_directory`) whose shards'
top-k are merged at search time (sharded.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import shutil
import time
from typing import Any

from absl import logging
import numpy as np

from retro_jax import fileio
from retro_jax.retrieval.db import database as database_lib
from retro_jax.retrieval.embed import embedder as embedder_lib
from retro_jax.retrieval.embed import hashing as hashing_lib
from retro_jax.retrieval.jobs import build_config as build_config_lib
from retro_jax.retrieval.jobs.build_config import BuildConfig
from retro_jax.retrieval.jobs.build_config import BuildError
from retro_jax.retrieval.search import scann as index_lib
from retro_jax.retrieval.store import chunk_store as chunk_store_lib
from retro_jax.retrieval.store import corpus as corpus_lib
from retro_jax.retrieval.store import tokenizer as tokenizer_lib


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


class EmbeddingParts:
  """The resumable parts of one embeddings file: what pins them, where each lies, how one is
  computed.  `embed_store` runs them in order; the Beam build (beam_pipelines.py) runs them
  on its workers, so both write the same part files and assemble them the same way."""

  def __init__(self, store, embedder_identity: dict, out_path: str, config: BuildConfig):
    self.store, self.out_path, self.config = store, out_path, config
    self.normalize = config.index.distance == "dot_product"
    self.settings = {
        "chunk_store_manifest_hash": fileio.manifest_hash(store.manifest),
        "num_chunks": int(store.num_chunks),
        "embedder": embedder_identity,
        "normalized": bool(self.normalize),
        "dtype": config.embeddings_dtype,
    }
    self.side = os.path.splitext(out_path)[0] + ".json"
    self.parts_dir = os.path.splitext(out_path)[0] + ".parts"
    self.part_size = config.shard_size
    self.num_parts = max(1, -(-store.num_chunks // self.part_size))

  def complete(self) -> dict | None:
    """The embeddings manifest if `out_path` is finished with these settings, else None."""
    if os.path.exists(self.out_path) and os.path.exists(self.side):
      done = fileio.read_json(self.side)
      if not all(done.get(key) == fileio.to_jsonable(v) for key, v in self.settings.items()):
        logging.warning("embeddings %s were made with other settings; recomputing",
                        self.out_path)
      elif fileio.file_sha256(self.out_path) == done.get("sha256"):  # reused only if undamaged
        return done
      else:
        logging.warning("embeddings %s do not match the sha256 recorded in %s (damaged); "
                        "recomputing them", self.out_path, self.side)
    return None

  def pin(self) -> None:
    """Records the job's settings next to its parts (refuses a restart with others)."""
    os.makedirs(self.parts_dir, exist_ok=True)
    job = dict(self.settings, shard_size=int(self.part_size))
    fileio.pin_settings(os.path.join(self.parts_dir, "job.json"), job, "embedding")

  def part_path(self, s: int) -> str:
    return os.path.join(self.parts_dir, f"shard-{s:05d}.npy")

  def bounds(self, s: int) -> tuple[int, int]:
    return s * self.part_size, min((s + 1) * self.part_size, self.store.num_chunks)

  def missing(self) -> list[int]:
    return fileio.missing_parts(range(self.num_parts), self.part_path)

  def write_part(self, s: int, embedder, tokenizer) -> None:
    """Embeds chunks [bounds(s)) in batches and writes part s atomically."""
    start, stop = self.bounds(s)
    batch_size, out = self.config.embed_batch_size, []
    for b in range(start, stop, batch_size):
      tokens = np.asarray(self.store.tokens[b:min(b + batch_size, stop)])
      x = np.asarray(embedder.embed_chunks(tokens, tokenizer), np.float32)
      out.append(index_lib.normalize(x) if self.normalize else x)
    fileio.atomic_save_npy(self.part_path(s),
                           np.concatenate(out).astype(self.config.embeddings_dtype))

  def assemble(self, done_chunks: int = 0, elapsed: float = 0.0) -> dict:
    """Copies every part into `out_path` (through plain file writes into a temporary file
    whose size is reserved first: a full disk is one `DiskFullError` naming the file, never
    a SIGBUS from a memory-mapped write), writes the embeddings manifest and removes the
    parts; returns that manifest."""
    num, dtype = self.store.num_chunks, np.dtype(self.config.embeddings_dtype)
    dim = int(np.load(self.part_path(0), mmap_mode="r").shape[1])
    tmp = self.out_path + ".assembling.tmp"
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": (num, dim)}
    try:
      with fileio.disk_full_named(self.out_path), open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        fileio.preallocate(f, f.tell() + num * dim * dtype.itemsize)
        for s in range(self.num_parts):
          part = np.load(self.part_path(s), mmap_mode="r")
          start, stop = self.bounds(s)
          if part.shape != (stop - start, dim):
            raise BuildError(f"embedding shard {self.part_path(s)} has shape {part.shape}, "
                             f"expected {(stop - start, dim)}; delete it and rerun")
          for lo in range(0, len(part), 1 << 16):
            f.write(np.ascontiguousarray(part[lo:lo + (1 << 16)], dtype).tobytes())
        f.flush()
    except BaseException:
      with contextlib.suppress(OSError):
        os.remove(tmp)
      raise
    fileio.commit_file(tmp, self.out_path)
    man = dict(self.settings, dim=dim, sha256=fileio.file_sha256(self.out_path),
               timings={"last_run_seconds": round(elapsed, 3),
                        "chunks_per_second": round(done_chunks / max(elapsed, 1e-9), 2)})
    fileio.atomic_write_json(self.side, man)
    shutil.rmtree(self.parts_dir, ignore_errors=True)
    return man


def embed_store(store, tokenizer, embedder, out_path: str, config: BuildConfig,
                after_shard=None) -> dict:
  """Embeds every chunk of `store` into `out_path` ([C, D] .npy), resumably.

  Vectors are unit-normalised for a dot_product index; storage dtype, shard and batch size
  come from `config`.  Returns the embeddings manifest (also written to
  `<out_path without .npy>.json`).
  """
  parts = EmbeddingParts(store, embedder.identity(), out_path, config)
  done = parts.complete()
  if done is not None:
    logging.info("embeddings %s already complete; reusing them", out_path)
    return done
  parts.pin()
  todo = parts.missing()
  logging.info("embedding %d chunks in %d shards (%d left)", store.num_chunks,
               parts.num_parts, len(todo))
  done_chunks, elapsed = fileio.run_parts(
      todo, store.num_chunks, parts.part_size,
      lambda s, start, stop: parts.write_part(s, embedder, tokenizer),
      desc="embedding", after_part=after_shard)
  if done_chunks:
    logging.info("embedded %d chunks in %.1fs (%.1f chunks/s)", done_chunks, elapsed,
                 done_chunks / max(elapsed, 1e-9))
  return parts.assemble(done_chunks, elapsed)


def build_database(corpus: Any, tokenizer: str, output: str, *, embedder=None,
                   after_shard=None, **settings) -> dict:
  """`build(BuildConfig(corpus, tokenizer, output, ...))`, the settings as keywords.

  `settings` are BuildConfig's fields, with IndexOptions' fields (distance, index_mode or
  mode, num_leaves, leaves_to_search, reorder, dims_per_block, spherical, soar,
  recall_queries, recall_ks) among them.  `corpus` may also be a `corpus.Corpus`.
  """
  config = build_config_lib.build_config(corpus, tokenizer, output, **settings)
  return build(config, embedder=embedder, after_shard=after_shard)


def documents(config: BuildConfig):
  """The documents `config` asks for: its corpus (first `max_documents` of them)."""
  docs = config.source
  if not isinstance(docs, (corpus_lib.Corpus, _Subset)):
    docs = corpus_lib.Corpus(docs, text_field=config.text_field, split=config.split)
  if config.max_documents is not None:
    docs = _Limited(docs, config.max_documents)
  return docs


def load_embedder(config: BuildConfig):
  """The embedder `config.bert` names, in `config.embed_dtype`."""
  kwargs = {"dtype": config.embed_dtype} if config.embed_dtype else {}
  return hashing_lib.load_embedder(config.bert, **kwargs)


def check_before_work(config: BuildConfig, embedder=None) -> None:
  """What can be refused before any chunking or embedding: the corpus (paths, the split of
  a DatasetDict), the tokenizer file, the embedder's checkpoint, and an --output that
  already holds another build.  Raises BuildError (or the corpus's / embedder's error)
  naming the fix."""
  if not isinstance(config.source, (corpus_lib.Corpus, _Subset)):
    corpus_lib.check_split(config.source, config.split)
  if not os.path.exists(config.tokenizer):
    raise BuildError(f"--tokenizer={config.tokenizer}: no such file; train one with "
                     "retro-train-tokenizer (python -m retro_jax.train_tokenizer)")
  if embedder is None:
    bert = config.bert
    if bert is None:
      embedder_lib.default_checkpoint_dir()  # raises, naming the pip command, when missing
    elif not str(bert).startswith("hashing") and (
        str(bert).startswith((".", "/", "~")) and not os.path.isdir(bert)):
      raise BuildError(f"--bert={bert}: not a BERT checkpoint directory")
  out = os.path.abspath(config.output)
  if os.path.isfile(out):
    raise BuildError(f"--output={config.output} is a file: choose another --output")
  store_manifest = os.path.join(out, "chunks", fileio.MANIFEST)
  if os.path.exists(store_manifest):
    old = fileio.read_json(store_manifest)
    if int(old.get("chunk_size", config.chunk_size)) != config.chunk_size:
      raise BuildError(
          f"{config.output} holds a database of chunk size {old.get('chunk_size')}, not "
          f"--chunk_size={config.chunk_size}: delete it or choose another --output")
    want = tokenizer_lib.load_tokenizer(config.tokenizer).identity().get("sha256")
    have = (old.get("tokenizer") or {}).get("sha256")
    if want and have and want != have:
      raise BuildError(f"{config.output} holds a database built with another tokenizer "
                       f"than {config.tokenizer}: delete it or choose another --output")
  elif os.path.isdir(out) and os.listdir(out) and not os.path.exists(
      os.path.join(out, "chunks")) and not any(n.startswith("chunks.tmp-") for n in
                                               os.listdir(out)):
    raise BuildError(f"--output={config.output} is a non-empty directory that holds no "
                     "database: delete it or choose another --output")


def build(config: BuildConfig, *, embedder=None, after_shard=None) -> dict:
  """Builds (or finishes building) the database at `config.output`; returns its manifest.

  Args:
    config: what to build (see build_config.py).
    embedder: an already loaded Embedder (overrides `config.bert`; tests pass a small one).
    after_shard: test hook called after each embedding shard.
  """
  check_before_work(config, embedder)
  return build_directory(documents(config), config.output, config, embedder=embedder,
                         after_shard=after_shard)


def build_directory(docs, output: str, config: BuildConfig, *, embedder=None,
                    after_shard=None) -> dict:
  """Steps 1-5 for the documents `docs` into the database directory `output`.

  Every step reuses what a previous run finished there.  `config` gives every setting but
  the corpus and output; `embedder` (default: loaded from `config`) may be a stand-in with
  the right identity when every embedding part already exists (the Beam build).
  """
  output, bert, options = os.path.abspath(output), config.bert, config.index
  os.makedirs(output, exist_ok=True)
  timings = {}
  tok = tokenizer_lib.load_tokenizer(config.tokenizer)

  # 1. Chunk store.
  t0 = time.time()
  store = chunk_store_lib.build_chunk_store(docs, tok, os.path.join(output, "chunks"),
                                            config.chunk_size, progress=True)
  timings["chunk_store_seconds"] = round(time.time() - t0, 3)

  # 2. Embeddings.
  t0 = time.time()
  if embedder is None:
    embedder = load_embedder(config)
  emb_man = embed_store(store, tok, embedder, os.path.join(output, "embeddings.npy"), config,
                        after_shard=after_shard)
  timings["embedding_seconds"] = round(time.time() - t0, 3)
  embeddings = np.load(os.path.join(output, "embeddings.npy"), mmap_mode="r")

  # 3. Index.
  t0 = time.time()
  index_dir = os.path.join(output, "index")
  wanted = options.resolve(store.num_chunks)
  index_man = None
  if os.path.exists(os.path.join(index_dir, fileio.MANIFEST)):
    existing = fileio.read_manifest(index_dir)
    if (existing.get("embeddings_sha256") == emb_man["sha256"] and
        existing.get("settings") == fileio.to_jsonable(wanted.__dict__)):
      try:  # reused only if its files hash as recorded and it loads
        index_lib.ScannIndex.load(index_dir, verify=True)
        logging.info("index %s already built for these embeddings; reusing it", index_dir)
        index_man = existing
      except fileio.ManifestError as e:
        logging.warning("index %s is damaged (%s); rebuilding it", index_dir,
                        fileio.first_line(e))
  if index_man is None:
    logging.info("building %s index over %d x %d embeddings", wanted.mode, *embeddings.shape)
    index = index_lib.ScannIndex.build(embeddings, options,
                                       embedder_identity=emb_man["embedder"],
                                       embeddings_sha256=emb_man["sha256"])
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
      "format": database_lib.DATABASE_FORMAT,
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
  src = database_lib.Database.open(source_db)
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
  # Record the source's embedder, so that queries against the subset (precompute_neighbors
  # with a query store, the service) are embedded as its vectors were.
  config = build_config_lib.build_config(docs, tok_path, output, chunk_size=store.chunk_size,
                                        distance=distance,
                                        bert=src.manifest.get("embedder_source"),
                                        **index_kwargs)
  return build(config, embedder=_FrozenEmbedder(emb_meta["embedder"]))

