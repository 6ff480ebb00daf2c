r"""The offline jobs as Apache Beam pipelines: a sharded database build, a neighbor precompute.

`python -m retro_jax.build_db ... --runner=DirectRunner --num_shards=S` and
`python -m retro_jax.precompute_neighbors ... --runner=DirectRunner` run these; without
`--runner` the same commands run in this process (build_db.py, precompute_neighbors.py).
Beam's own options go in one string, `--beam_options="--direct_num_workers=2
--direct_running_mode=multi_processing"` (Dataflow: `--project=P --region=R
--temp_location=gs://B/tmp`, ...), and are checked against Beam's option parser before any
work: an unknown option or a bad value is a one-line error.

`--runner=DirectRunner` is Beam's classic Python runner (`_classic_direct_runner`): Beam
2.78's own "DirectRunner" would first try Prism, downloading an executable at run time.  Its
multi_processing workers are killed with their driver (`_WorkersDieWithDriver`).

Files are read and written with plain POSIX calls, so every worker must see the output
directory at the same path: the local disk for the DirectRunner, a shared filesystem
(NFS, Filestore, a GCS FUSE mount) for Dataflow, Flink or Spark workers.

Build (`build_database`), corpus -> sharded database (format: sharded.py):
  1. plan (driver): one pass over the corpus counts its documents and their bytes; the
     document sequence is cut into `num_shards` contiguous ranges of about equal bytes, so
     global document and chunk ids equal those of the in-process build of the same corpus.
  2. per shard (ParDo): the chunk store of its documents (`chunk_store.build_chunk_store`),
     in DB/shard-SSSSS.partial/; emits its missing embedding parts.
  3. per embedding part (ParDo after a Reshuffle, so parts spread over workers): the
     embedder is loaded once per worker in `DoFn.setup()`; `build_lib.EmbeddingParts` embeds
     the part in batches and writes it atomically, exactly as the in-process build does.
  4. per shard, once its parts are in (GroupByKey): `build_lib.build_directory` assembles the
     embeddings, builds the shard's ScaNN index (the same `IndexOptions` for every shard),
     copies the tokenizer and writes the shard's manifest; the directory is then renamed to
     DB/shard-SSSSS.  A shard directory without `.partial` is complete.
  5. once (after every shard): `sharded.write_shards_manifest` writes DB/shards.json.
A rerun skips complete shards and, inside an unfinished one, the finished chunk store and
embedding parts: a killed pipeline resumes where it stopped and writes the same bytes.

Neighbors (`precompute_neighbors`), database (sharded or not) -> sharded neighbors files:
  query shards are the database's shards when the queries are its own chunks (the
  default), else `part_size`-row ranges of the query store.  The driver checks every
  recorded hash of the database first, loading one shard's index at a time.  Each (index
  shard, query part) pair is one element, keyed by the index shard and grouped by it
  (GroupByKey), so one `_SearchShard` call takes every query part of one index shard: it
  loads that shard's index, searches every part with same-document exclusion by global
  document id (`index.search_excluding`, re-asking short rows) and frees the index before
  it returns; a process-wide semaphore keeps a worker process at MAX_INDEX_SHARDS_PER_PROCESS
  (1) index shard at a time whatever the runner's threading (the worker opens the job once
  in `setup()`, precompute_neighbors._Job with hold_indexes=False: database, query store,
  embedder, memory-mapped, no index).  The parts of a query shard are then grouped and
  merged per row by distance, ties to the earlier shard, as `sharded.ShardedIndex` merges
  (`index.merge_topk`, a stable sort), -1 / +inf padded.  Output:
    OUTPUT/neighbors-QQQQQ.npy   int64 [n_q, k]    global database chunk ids
    OUTPUT/distances-QQQQQ.npy   float32 [n_q, k]
    OUTPUT/neighbors-QQQQQ.json  the shard's rows, padding counts and both files' sha256;
                                 written last
    OUTPUT/manifest.json         what the in-process job writes, plus "shards" (each with
                                 its files' sha256, checked by `python -m retro_jax.verify`)
  `neighbors.load_neighbors` reads it as one [Q, k] memory-mapped view.  With an exact
  index the rows equal the in-process job's.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import sys
import threading
import time
import weakref
from typing import Any, Callable, Sequence

from absl import logging
import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options import pipeline_options as beam_options_lib
import numpy as np

from retro_jax import fileio
from retro_jax import options as options_lib
from retro_jax.retrieval.db import sharded
from retro_jax.retrieval.jobs import build as build_lib
from retro_jax.retrieval.jobs import precompute as pn_lib
from retro_jax.retrieval.jobs.build_config import BuildConfig
from retro_jax.retrieval.jobs.precompute_config import PrecomputeConfig
from retro_jax.retrieval.search import scann as index_lib
from retro_jax.retrieval.store import chunk_store as chunk_store_lib
from retro_jax.retrieval.store import corpus as corpus_lib
from retro_jax.retrieval.store import tokenizer as tokenizer_lib

PARTIAL = ".partial"
COUNTERS = "retro_jax"


class BeamError(options_lib.ConfigError):
  """Bad Beam runner or pipeline options; the message names the offending one."""


class _OptionParser(beam_options_lib._BeamArgumentParser):  # pylint: disable=protected-access
  """Beam's option parser, raising instead of exiting the process."""

  def error(self, message):
    raise BeamError(f"bad Beam pipeline option: {message}")


def pipeline_options(runner: str | None, beam_options: str | None) -> Any:
  """The `PipelineOptions` of `--runner` and `--beam_options`, every option checked.

  Raises BeamError for an unknown runner, an option no Beam options class defines, or a
  value its parser refuses (e.g. `--direct_num_workers=two`).
  """
  argv = options_lib.beam_argv(runner, beam_options, BeamError)
  if not argv:
    raise BeamError("a Beam pipeline needs a runner (e.g. --runner=DirectRunner)")
  parser = _OptionParser(allow_abbrev=False)
  classes = {}
  for cls in beam_options_lib.PipelineOptions.__subclasses__():
    classes.setdefault(str(cls), cls)
  for cls in classes.values():
    cls._add_argparse_args(parser)  # pylint: disable=protected-access
  _, unknown = parser.parse_known_args(argv)
  if unknown:
    raise BeamError(f"unknown Beam pipeline option {unknown[0]!r} (in --beam_options)")
  return beam_options_lib.PipelineOptions(argv)


def _classic_direct_runner(options) -> Any:
  """The Python DirectRunner itself (Beam's FnApiRunner, in memory or with
  `--direct_running_mode` workers).  Beam 2.78's "DirectRunner" first tries its Prism
  runner, which downloads an executable from the internet at run time; a batch job on this
  machine must never do that, so `--runner=DirectRunner` gets this runner instead."""
  from apache_beam.portability.api import beam_provision_api_pb2  # pylint: disable=g-import-not-at-top
  from apache_beam.runners.portability import portable_runner  # pylint: disable=g-import-not-at-top
  from apache_beam.runners.portability.fn_api_runner import fn_runner  # pylint: disable=g-import-not-at-top
  encoded = portable_runner.JobServiceHandle.encode_pipeline_options(
      options.get_all_options())
  return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
      beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


# Run by a fresh interpreter between the shell Beam starts and the worker it starts: asks
# Linux to SIGKILL this process when the driver thread that started it dies
# (PR_SET_PDEATHSIG, kept across exec), leaves at once if the driver is already gone, then
# becomes the worker.  Nothing runs between fork and exec in the driver: a `preexec_fn`
# there runs Python in a copy of a process full of gRPC threads, and can deadlock before
# exec (then Beam waits for the worker forever).
_DIE_WITH_DRIVER = """\
import ctypes, os, signal, sys
try:
  ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
except (OSError, AttributeError):
  pass
if os.getppid() != int(sys.argv[1]):
  os._exit(1)
os.execv("/bin/sh", ["/bin/sh", "-c", "exec " + sys.argv[2]])
"""


class _WorkersDieWithDriver:
  """While a pipeline runs, the DirectRunner's multi_processing workers are started through
  `_DIE_WITH_DRIVER`, so a killed driver leaves no worker behind (Beam starts them with
  subprocess.Popen(shell=True) in local_job_service and gives no hook for it, so its
  module's `subprocess` is replaced by one that prefixes the command line)."""

  def __enter__(self):
    import shlex  # pylint: disable=g-import-not-at-top
    import subprocess  # pylint: disable=g-import-not-at-top
    import types  # pylint: disable=g-import-not-at-top
    from apache_beam.runners.portability import local_job_service  # pylint: disable=g-import-not-at-top

    def popen(args, *rest, **kwargs):
      if (kwargs.get("shell") and isinstance(args, str)
          and sys.platform.startswith("linux")):
        args = "exec " + shlex.join([sys.executable, "-c", _DIE_WITH_DRIVER,
                                     str(os.getpid()), args])
      return subprocess.Popen(args, *rest, **kwargs)

    self._module, self._old = local_job_service, local_job_service.subprocess
    shim = types.SimpleNamespace(**{k: getattr(subprocess, k) for k in dir(subprocess)
                                    if not k.startswith("__")})
    shim.Popen = popen
    local_job_service.subprocess = shim
    return self

  def __exit__(self, *exc):
    self._module.subprocess = self._old


def _run(pipeline_builder: Callable[[Any], None], options) -> Any:
  """Builds and runs a pipeline to completion; returns its result (for its metrics)."""
  standard = options.view_as(beam_options_lib.StandardOptions)
  runner = _classic_direct_runner(options) if standard.runner == "DirectRunner" else None
  pipeline = beam.Pipeline(runner=runner, options=options)
  pipeline_builder(pipeline)
  with _WorkersDieWithDriver():
    result = pipeline.run()
    result.wait_until_finish()
  return result


def counters(result) -> dict[str, int]:
  """The pipeline's retro_jax counters by name (summed over workers)."""
  out = {}
  try:
    query = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(COUNTERS))
  except (NotImplementedError, AttributeError):  # runners without metrics
    return out
  for c in query["counters"]:
    out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(c.committed or c.attempted
                                                                 or 0)
  return out


# ------------------------------------------------------------------------------------------
# Build: corpus -> sharded database.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardPlan:
  """Documents [first_doc, stop_doc) of the corpus, read as pieces (kind, path, start, stop)
  of its source entries: documents start..stop of that entry."""
  index: int
  first_doc: int
  stop_doc: int
  num_bytes: int
  pieces: tuple[tuple[str, str, int, int], ...]

  @property
  def name(self) -> str:
    return sharded.shard_name(self.index)


def plan_shards(config: BuildConfig) -> list[ShardPlan]:
  """Cuts the corpus's document sequence into `num_shards` contiguous ranges of about equal
  bytes (one reading pass, no tokenising)."""
  entries = corpus_lib.resolve_sources(config.source)
  per_entry, sizes = [], []
  limit = config.max_documents
  for kind, path in entries:
    n = 0
    for doc in corpus_lib.iter_documents([path], config.text_field, fmt=kind,
                                         split=config.split):
      if limit is not None and len(sizes) >= limit:
        break
      sizes.append(len(doc.text.encode("utf-8")))
      n += 1
    per_entry.append(n)
  num_docs = len(sizes)
  if num_docs < config.num_shards:
    raise build_lib.BuildError(f"num_shards={config.num_shards} but the corpus has only "
                              f"{num_docs} documents (a shard holds whole documents)")
  cum = np.concatenate([[0], np.cumsum(np.asarray(sizes, np.int64))])
  targets = cum[-1] * np.arange(1, config.num_shards) / config.num_shards
  cuts = [0]
  for s, t in enumerate(targets, start=1):
    cut = int(np.searchsorted(cum, t, side="left"))
    # Every shard keeps at least one document, and leaves one for each shard after it.
    cut = min(max(cut, cuts[-1] + 1), num_docs - (config.num_shards - s))
    cuts.append(cut)
  cuts.append(num_docs)
  entry_start = np.concatenate([[0], np.cumsum(per_entry)])
  plans = []
  for s in range(config.num_shards):
    lo, hi = cuts[s], cuts[s + 1]
    pieces = []
    for (kind, path), a, b in zip(entries, entry_start[:-1], entry_start[1:]):
      if b > lo and a < hi:
        pieces.append((kind, path, int(max(lo, a) - a), int(min(hi, b) - a)))
    plans.append(ShardPlan(s, lo, hi, int(cum[hi] - cum[lo]), tuple(pieces)))
  return plans


class ShardDocuments:
  """The documents of one shard, read from just the source entries that hold them."""

  def __init__(self, config: BuildConfig, plan: ShardPlan):
    self._config, self._plan = config, plan
    self.stats = corpus_lib.CorpusStats()

  @property
  def description(self) -> dict:
    desc = corpus_lib.describe_source(self._config.source, self._config.text_field)
    desc["shard"] = {"index": self._plan.index,
                     "documents": [self._plan.first_doc, self._plan.stop_doc]}
    return desc

  def __iter__(self):
    self.stats = corpus_lib.CorpusStats()
    for kind, path, start, stop in self._plan.pieces:
      docs = corpus_lib.iter_documents([path], self._config.text_field, fmt=kind,
                                       stats=self.stats, split=self._config.split)
      for i, doc in enumerate(docs):
        if i >= stop:
          break
        if i >= start:
          yield doc


class _Identity:
  """Stands in for the embedder at the shard's last step, when every part is embedded:
  it has the identity the parts were made with and refuses to embed anything."""

  def __init__(self, identity: dict):
    self._identity = identity

  def identity(self) -> dict:
    return self._identity

  def embed_chunks(self, *args, **kwargs):
    raise build_lib.BuildError("a Beam shard's embedding parts should all exist before its "
                              "index is built")


def _paths(db_dir: str, name: str) -> tuple[str, str]:
  final = os.path.join(db_dir, name)
  return final, final + PARTIAL


def shard_complete(db_dir: str, name: str) -> bool:
  return os.path.exists(os.path.join(db_dir, name, fileio.MANIFEST))


class _ChunkShard(beam.DoFn):
  """plan -> the shard's chunk store (in its .partial directory); emits (name, part) for each
  embedding part still missing, and (name, None) so the shard is finished even if none is."""

  def __init__(self, config: BuildConfig, db_dir: str):
    self._config, self._db_dir = config, db_dir
    self._tok = None

  def setup(self):
    self._tok = tokenizer_lib.load_tokenizer(self._config.tokenizer)

  def process(self, plan: ShardPlan):
    _, partial = _paths(self._db_dir, plan.name)
    store = chunk_store_lib.build_chunk_store(
        ShardDocuments(self._config, plan), self._tok, os.path.join(partial, "chunks"),
        self._config.chunk_size)
    Metrics.counter(COUNTERS, "chunk_stores").inc()
    emb = os.path.join(partial, "embeddings.npy")
    if not os.path.exists(os.path.splitext(emb)[0] + ".json"):
      parts = build_lib.EmbeddingParts(store, {}, emb, self._config)
      for s in parts.missing():
        yield plan.name, s
    yield plan.name, None


class _EmbedPart(beam.DoFn):
  """(shard, part) -> the part's embeddings file; the embedder is loaded once per worker."""

  def __init__(self, config: BuildConfig, db_dir: str, embedder=None):
    self._config, self._db_dir, self._embedder = config, db_dir, embedder
    self._tok = None
    self._stores = {}

  def setup(self):
    self._tok = tokenizer_lib.load_tokenizer(self._config.tokenizer)
    if self._embedder is None:
      self._embedder = build_lib.load_embedder(self._config)

  def process(self, element):
    name, s = element
    if s is None:
      yield name
      return
    _, partial = _paths(self._db_dir, name)
    if name not in self._stores:
      self._stores[name] = chunk_store_lib.ChunkStore.open(os.path.join(partial, "chunks"))
    store = self._stores[name]
    parts = build_lib.EmbeddingParts(store, self._embedder.identity(),
                                    os.path.join(partial, "embeddings.npy"), self._config)
    parts.pin()
    if not os.path.exists(parts.part_path(s)):
      t0 = time.time()
      parts.write_part(s, self._embedder, self._tok)
      start, stop = parts.bounds(s)
      Metrics.counter(COUNTERS, "embedded_chunks").inc(stop - start)
      Metrics.counter(COUNTERS, "embedding_ms").inc(int(1000 * (time.time() - t0)))
    yield name


class _FinishShard(beam.DoFn):
  """(name, _) -> the shard's embeddings assembled, index, manifest; renamed into place."""

  def __init__(self, config: BuildConfig, db_dir: str, plans: Sequence[ShardPlan],
               after_shard: Callable[[str], None] | None = None):
    self._config, self._db_dir = config, db_dir
    self._plans = {p.name: p for p in plans}
    self._after_shard = after_shard

  def process(self, element):
    name = element[0]
    final, partial = _paths(self._db_dir, name)
    job = os.path.join(partial, "embeddings.parts", "job.json")
    side = os.path.join(partial, "embeddings.json")
    identity = fileio.read_json(job if os.path.exists(job) else side)["embedder"]
    build_lib.build_directory(ShardDocuments(self._config, self._plans[name]), partial,
                             self._config, embedder=_Identity(identity))
    os.replace(partial, final)
    Metrics.counter(COUNTERS, "shards_built").inc()
    logging.info("shard %s complete", final)
    if self._after_shard is not None:
      self._after_shard(name)
    yield name


def build_database(config: BuildConfig, *, embedder=None,
                   after_shard: Callable[[str], None] | None = None,
                   stats: dict | None = None) -> dict:
  """Builds (or finishes) the sharded database `config.output` on `config.runner`.

  Args:
    config: what to build; `num_shards` shards, Beam options from `runner`/`beam_options`.
    embedder: an embedder object for the workers (pickled to them; default: each worker
      loads `config.bert` once).
    after_shard: test hook, called with a shard's name once it is complete (on a worker).
    stats: if given, filled with the pipeline's counters and the wall time.
  Returns the shards.json manifest.
  """
  options = pipeline_options(config.runner, config.beam_options)
  db_dir = os.path.abspath(config.output)
  os.makedirs(db_dir, exist_ok=True)
  t0 = time.time()
  plans = plan_shards(config)
  todo = [p for p in plans if not shard_complete(db_dir, p.name)]
  logging.info("Beam build of %s: %d shards (%d left) on %s", db_dir, len(plans), len(todo),
               config.runner)
  result = None
  if todo:
    def pipeline(p):
      chunked = (p | "Shards" >> beam.Create(todo)
                 | "ChunkStore" >> beam.ParDo(_ChunkShard(config, db_dir)))
      embedded = (chunked | "Spread" >> beam.Reshuffle()
                  | "Embed" >> beam.ParDo(_EmbedPart(config, db_dir, embedder)))
      _ = (embedded | "ByShard" >> beam.Map(lambda name: (name, 1))
           | "Parts" >> beam.CombinePerKey(sum)
           | "Finish" >> beam.ParDo(_FinishShard(config, db_dir, plans, after_shard)))
    result = _run(pipeline, options)
  missing = [p.name for p in plans if not shard_complete(db_dir, p.name)]
  if missing:
    raise build_lib.BuildError(f"the pipeline finished but shards {missing} are incomplete")
  man = sharded.write_shards_manifest(db_dir, [p.name for p in plans])
  if stats is not None:
    stats.update(counters(result) if result is not None else {})
    stats["wall_seconds"] = time.time() - t0
  logging.info("sharded database %s: %d shards, %d chunks", db_dir, len(plans),
               man["num_chunks"])
  return man


# ------------------------------------------------------------------------------------------
# Neighbors: every query shard against every index shard.
# ------------------------------------------------------------------------------------------


def _shards_of(db) -> tuple[list, list[int], list[int], list[np.ndarray]]:
  """(shard databases, their chunk and document offsets, their dropped local chunk ids)."""
  if isinstance(db, sharded.ShardedDatabase):
    entries = db.manifest["shards"]
    return (list(db.shards), [int(e["chunk_offset"]) for e in entries],
            [int(e["doc_offset"]) for e in entries], list(db.dropped_chunks()))
  return [db], [0], [0], [np.zeros(0, np.int64)]


def _query_shards(job, size: int) -> list[tuple[int, int]]:
  """Row ranges of the query shards: the database's shards for its own chunks, else
  `size`-row ranges of the query store."""
  if job.query_is_db:
    shards, offsets, _, _ = _shards_of(job.db)
    return [(o, o + s.num_chunks) for s, o in zip(shards, offsets)]
  n = job.num_queries
  return [(a, min(a + size, n)) for a in range(0, max(n, 1), size)]


def _shard_file(output: str, q: int, what: str) -> str:
  return os.path.join(output, f"{what}-{q:05d}.npy" if what != "stats" else
                      f"neighbors-{q:05d}.json")


# Index shards a worker process holds at once (the memory bound; see `_SearchShard`).
MAX_INDEX_SHARDS_PER_PROCESS = 1
_SHARD_SLOTS = threading.BoundedSemaphore(MAX_INDEX_SHARDS_PER_PROCESS)
_LIVE_INDEXES = weakref.WeakSet()  # Every shard index loaded in this process and not freed.


class _SearchShard(beam.DoFn):
  """(s, [(q, start, stop), ...]) -> (q, (start, s, ids, distances, requeried)) per part:
  every query part against index shard s, same-document exclusion by global document id.

  The memory bound, by construction: the elements are grouped by index shard before this
  step, so one call sees every query part of one shard; it loads that shard's index inside
  the call and drops it (the shard `Database`'s cached copy too) before it returns, and the
  load waits on a process-wide semaphore of `MAX_INDEX_SHARDS_PER_PROCESS` (1) slots, so
  even a runner that runs several bundles in threads of one process (Dataflow's Python
  harness, the DirectRunner's in-process mode) never holds two shards' indexes in one
  process: it runs them one after the other.  Nothing else of the job loads an index (the
  worker's job opens the database with `hold_indexes=False, verify=False`; the driver
  verifies it before the pipeline, one shard index at a time).  Embeddings, chunk stores
  and query rows stay memory-mapped.  The price: at most one worker per index shard
  searches at a time (parallelism = the number of index shards).

  load_log: test hook, a file to which every load appends one JSON line {pid, shard, live}
  (`live`: this process's shard indexes not yet freed, the new one included).
  """

  def __init__(self, config: PrecomputeConfig, embedder=None, load_log: str | None = None):
    self._config, self._embedder, self._load_log = config, embedder, load_log
    self._job = None

  def setup(self):
    self._job = pn_lib._Job(self._config, self._embedder, hold_indexes=False, verify=False)  # pylint: disable=protected-access

  def _load(self, s: int):
    """Shard s's searcher (local ids, dropped chunks never returned), its chunk offset and
    the global document id of each of its chunks."""
    shards, chunk_offsets, doc_offsets, dropped = _shards_of(self._job.db)
    index = shards[s].index
    _LIVE_INDEXES.add(index)
    searcher = sharded.ShardedIndex([index], [0], [dropped[s]])
    if self._config.leaves_to_search:
      searcher = pn_lib._LeavesOverride(searcher, self._config.leaves_to_search)  # pylint: disable=protected-access
    doc_ids = np.asarray(shards[s].store.doc_ids).astype(np.int64) + doc_offsets[s]
    Metrics.counter(COUNTERS, "index_loads").inc()
    if self._load_log:
      with open(self._load_log, "a", encoding="utf-8") as f:
        f.write(json.dumps({"pid": os.getpid(), "shard": s,
                            "live": len(_LIVE_INDEXES)}) + "\n")
    return searcher, chunk_offsets[s], doc_ids

  def _release(self, s: int) -> None:
    _shards_of(self._job.db)[0][s].release_index()
    gc.collect()  # ScaNN's memory goes back now, before another shard's index loads.

  def process(self, element):
    s, parts = element
    job = self._job
    with _SHARD_SLOTS:
      try:
        searcher, offset, doc_ids = self._load(s)
        for q, start, stop in sorted(parts):
          queries = job.query_embeddings(start, stop)
          groups = job.query_doc_groups()[start:stop] if job.exclude else None
          ids, dist, stats = index_lib.search_excluding(
              searcher, queries, job.k, candidate_groups=doc_ids if job.exclude else None,
              exclude_groups=groups, extra=job.extra, max_candidates=job.max_candidates)
          ids = np.where(ids >= 0, ids + offset, -1)
          Metrics.counter(COUNTERS, "searched_rows").inc(stop - start)
          yield q, (start, s, ids, dist, int(stats["requeried_rows"]))
      finally:
        searcher = None  # pylint: disable=unused-variable
        self._release(s)


class _MergeShard(beam.DoFn):
  """(q, per-(part, index shard) results) -> the query shard's neighbor files."""

  def __init__(self, output: str, bounds: Sequence[tuple[int, int]], k: int, job_hash: str):
    self._output, self._bounds, self._k, self._job_hash = output, list(bounds), k, job_hash

  def process(self, element):
    q, results = element
    by_start = {}
    requeried = 0
    for start, s, ids, dist, req in results:
      by_start.setdefault(start, []).append((s, ids, dist))
      requeried += req
    out_ids, out_d = [], []
    for start in sorted(by_start):
      got = sorted(by_start[start], key=lambda r: r[0])
      ids, dist = index_lib.merge_topk([r[1] for r in got], [r[2] for r in got], self._k)
      out_ids.append(ids)
      out_d.append(dist)
    a, b = self._bounds[q]
    ids = np.concatenate(out_ids) if out_ids else np.zeros((0, self._k), np.int64)
    dist = np.concatenate(out_d) if out_d else np.zeros((0, self._k), np.float32)
    if ids.shape[0] != b - a:
      raise pn_lib.PrecomputeError(f"query shard {q} got {ids.shape[0]} rows, expected "
                                   f"{b - a}")
    fileio.atomic_save_npy(_shard_file(self._output, q, "neighbors"), ids)
    fileio.atomic_save_npy(_shard_file(self._output, q, "distances"), dist.astype(np.float32))
    sha = {name: fileio.file_sha256(_shard_file(self._output, q, name))
           for name in ("neighbors", "distances")}  # what `python -m retro_jax.verify` checks
    fileio.atomic_write_json(_shard_file(self._output, q, "stats"), {
        "job": self._job_hash, "row_offset": a, "num_rows": b - a, "sha256": sha,
        "padded_rows": int(np.sum(np.any(ids < 0, axis=1))),
        "padded_entries": int(np.sum(ids < 0)), "requeried_rows": int(requeried)})
    Metrics.counter(COUNTERS, "query_shards_written").inc()
    yield q


def _shard_done(output: str, q: int, job_hash: str) -> bool:
  path = _shard_file(output, q, "stats")
  return os.path.exists(path) and fileio.read_json(path).get("job") == job_hash


def precompute_neighbors(config: PrecomputeConfig, *, embedder=None,
                         stats: dict | None = None, load_log: str | None = None) -> dict:
  """The neighbors of every query chunk, as sharded neighbor files (see the module doc).

  A rerun skips query shards whose files are complete; other settings than an unfinished
  run's are refused.  `load_log`: test hook (`_SearchShard`), a file that records every
  index shard load.  Returns the manifest.
  """
  options = pipeline_options(config.runner, config.beam_options)
  output = os.path.abspath(config.output)
  t0 = time.time()
  job = pn_lib._Job(config, embedder, hold_indexes=False)  # pylint: disable=protected-access
  bounds = _query_shards(job, config.part_size)
  settings = dict(job.settings(config.part_size), layout="sharded",
                  query_shards=[list(b) for b in bounds])
  job_hash = fileio.stable_hash(settings)
  final_manifest = os.path.join(output, fileio.MANIFEST)
  if os.path.exists(final_manifest):
    existing = fileio.read_json(final_manifest)
    if fileio.stable_hash(existing.get("job", {})) == job_hash:
      logging.info("neighbors in %s are complete for these settings; nothing to do", output)
      return existing
    raise fileio.ManifestMismatchError(
        f"{output} already holds neighbors built with other settings (job "
        f"{fileio.stable_hash(existing.get('job', {}))[:12]} vs requested {job_hash[:12]}); "
        "use another --output or delete it")
  parts_dir = os.path.join(output, "parts")
  os.makedirs(parts_dir, exist_ok=True)
  fileio.pin_settings(os.path.join(parts_dir, "job.json"), settings, "precompute")
  shards = _shards_of(job.db)[0]
  todo = [q for q in range(len(bounds)) if not _shard_done(output, q, job_hash)]
  elements = []
  for q in todo:
    a, b = bounds[q]
    for start in range(a, max(b, a + 1), config.part_size):
      stop = min(start + config.part_size, b)
      elements += [(s, (q, start, stop)) for s in range(len(shards))]
  logging.info("Beam precompute: %d query shards (%d left) x %d index shards, %d elements, "
               "on %s", len(bounds), len(todo), len(shards), len(elements), config.runner)
  result = None
  if todo:
    def pipeline(p):
      _ = (p | "Parts" >> beam.Create(elements)
           | "ByIndexShard" >> beam.GroupByKey()
           | "Search" >> beam.ParDo(_SearchShard(config, embedder, load_log))
           | "ByQueryShard" >> beam.GroupByKey()
           | "Merge" >> beam.ParDo(_MergeShard(output, bounds, job.k, job_hash)))
    result = _run(pipeline, options)
  missing = [q for q in range(len(bounds)) if not _shard_done(output, q, job_hash)]
  if missing:
    raise pn_lib.PrecomputeError(f"the pipeline finished but query shards {missing} are "
                                 "missing")
  entries, padded, padded_entries, requeried = [], 0, 0, 0
  for q in range(len(bounds)):
    st = fileio.read_json(_shard_file(output, q, "stats"))
    entries.append({"neighbors": os.path.basename(_shard_file(output, q, "neighbors")),
                    "distances": os.path.basename(_shard_file(output, q, "distances")),
                    "row_offset": st["row_offset"], "num_rows": st["num_rows"]})
    if "sha256" in st:
      entries[-1]["sha256"] = st["sha256"]
    padded += st["padded_rows"]
    padded_entries += st["padded_entries"]
    requeried += st["requeried_rows"]
  man = {key: settings[key] for key in ("format", "k", "database", "query", "tokenizer",
                                        "embedder", "index_id", "distance",
                                        "exclude_same_document")}
  man.update({"num_queries": job.num_queries, "job": settings, "padded_rows": padded,
              "padded_entries": padded_entries, "requeried_rows": requeried,
              "shards": entries})
  fileio.atomic_write_json(final_manifest, man)
  shutil.rmtree(parts_dir, ignore_errors=True)
  if stats is not None:
    stats.update(counters(result) if result is not None else {})
    stats["wall_seconds"] = time.time() - t0
  logging.info("Beam precompute: wrote %s (%d x %d in %d shards)", output, job.num_queries,
               job.k, len(bounds))
  return man
