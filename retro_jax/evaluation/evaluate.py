"""Perplexity and bits-per-byte of whole documents, with and without retrieval (library).

`run_evaluation(...)` is what `python -m retro_jax.evaluate` calls:

1. Load the RETRO checkpoint (and optionally a baseline checkpoint for the side-by-side
   table), the evaluation documents (a chunk store or a corpus tokenised like one) and a
   retrieval source (database directory, retrieval service, or precomputed neighbors for
   the evaluation chunk store).  Chunk size and tokenizer of checkpoint, database and
   evaluation data must agree; a mismatch is refused naming both.
2. Neighbors: for every evaluation chunk, the K = max(k list, 10) nearest database chunks,
   retrieved with the chunk's own tokens (see scoring.py for why that is causal), with no
   same-document exclusion unless asked.  Evaluation documents that also appear in the
   database (same content or same key) are reported and warned about.
3. Leakage: r(C) per chunk from its 10 nearest neighbors (leakage.py).
4. Scoring (scoring.py): every token of every document exactly once, windows of n tokens
   with stride s; RETRO with retrieval off and with each k of the list (the first k
   neighbors), the baseline once.
5. Report: per run and per document, tokens, NLL, perplexity exp(NLL / tokens), bits per
   UTF-8 byte (NLL / ln 2 / bytes) and bpb(alpha); a terminal table and a JSON file
   (written atomically).

Token counts include each document's eos (the chunk store appends one); bytes are the
chunk store's doc_bytes (UTF-8 bytes of the original text).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from absl import logging
import numpy as np
import tqdm

from retro_jax import fileio
from retro_jax import integrity
from retro_jax import options as options_lib
from retro_jax import provenance
from retro_jax import tables
from retro_jax.evaluation import copy_model as copy_model_lib
from retro_jax.evaluation import eval_config as eval_config_lib
from retro_jax.evaluation import leakage as leakage_lib
from retro_jax.evaluation import scoring
from retro_jax.evaluation import sources
from retro_jax.inference import checkpoints as ckpt_lib
from retro_jax.inference import session as session_lib
from retro_jax.retrieval.serve import client as client_lib
from retro_jax.retrieval.store import align as align_lib
from retro_jax.retrieval.store import chunk_store as chunk_store_lib

# The job's configuration lives in eval_config.py; these names stay importable here.
DEFAULT_KS = eval_config_lib.DEFAULT_KS
EvalConfig = eval_config_lib.EvalConfig
EvalSettings = eval_config_lib.EvalSettings

# Bad input, unreachable services, missing files: what a CLI reports in one line.
USER_ERRORS = (ValueError, OSError, client_lib.RetrievalServiceError)


@dataclasses.dataclass
class Contender:
  """A model to score: a logits function (static for jit), its params, and a name."""
  name: str
  logits_fn: scoring.LogitsFn
  params: Any
  uses_retrieval: bool
  # How the model was trained to see its neighbors (aligned / filtered; retrieval/store/align.py).
  presentation: align_lib.Presentation = align_lib.Presentation()
  train_k: int = 0  # neighbors per chunk in training (the copy model reads that many)


def score_documents(contender: Contender, docs: sources.EvalDocs, eos_id: int,
                    settings: EvalSettings, table: sources.NeighborTable | None = None,
                    k: int = 0, desc: str = "") -> list[np.ndarray]:
  """Per-token NLL (nats) of every document: list of float64 [L_d], entry i for token t_i.

  Windows of `settings.seq_len` tokens every `settings.stride` (both set), scored
  `settings.batch_size` at a time; the first k neighbors of `table` when k > 0.
  """
  seq_len, stride, batch_size = settings.seq_len, settings.stride, settings.batch_size
  m = docs.chunk_size
  l = seq_len // m
  doc_tokens = [docs.tokens(d) for d in range(docs.num_documents)]
  out = [np.zeros(len(t), np.float64) for t in doc_tokens]
  use_nb = contender.uses_retrieval and table is not None and k > 0
  if use_nb and k > table.k:
    raise ValueError(f"k={k} but only {table.k} neighbors per chunk were retrieved")

  # t_0 of every document, after the context [eos] (see scoring.py).
  for lo in range(0, docs.num_documents, batch_size):
    hi = min(lo + batch_size, docs.num_documents)
    inputs = np.full((batch_size, 1), eos_id, np.int32)
    targets = np.zeros((batch_size, 1), np.int32)
    weights = np.zeros((batch_size, 1), np.float32)
    for i, d in enumerate(range(lo, hi)):
      targets[i, 0] = doc_tokens[d][0]
      weights[i, 0] = 1.0
    nll, _, _ = scoring.score_batch(contender.logits_fn, contender.params, inputs, targets,
                                    weights, None)
    nll = np.asarray(nll)
    for i, d in enumerate(range(lo, hi)):
      out[d][0] = nll[i, 0]

  windows = [w for d, t in enumerate(doc_tokens)
             for w in scoring.plan_windows(len(t), seq_len, stride, m, d)]
  batches = range(0, len(windows), batch_size)
  if settings.progress:
    batches = tqdm.tqdm(batches, desc=desc or contender.name, unit="batch")
  for lo in batches:
    batch = windows[lo:lo + batch_size]
    inputs, targets, weights = scoring.window_arrays(batch, doc_tokens, seq_len,
                                                     settings.pad_id, batch_size)
    nb = None
    if use_nb:
      r = table.tokens.shape[-1]
      nb = np.full((batch_size, l, k, r), -1, np.int32)  # [B, l, k, r]
      for i, w in enumerate(batch):
        c0 = int(docs.doc_offsets[w.doc]) + w.start // m
        nc = -(-w.length // m)
        nb[i, :nc] = table.tokens[c0:c0 + nc, :k]
    nll, _, _ = scoring.score_batch(contender.logits_fn, contender.params, inputs, targets,
                                    weights, nb)
    nll = np.asarray(nll)
    for i, w in enumerate(batch):
      a, b = w.score_from - w.start, w.length
      out[w.doc][w.score_from + 1:w.start + w.length + 1] = nll[i, a:b]
  return out


def chunk_totals(token_nll: list[np.ndarray], docs: sources.EvalDocs):
  """Per evaluation chunk: NLL of its target tokens [C], tokens [C], bytes [C] (bytes
  split in proportion to tokens, see leakage.py)."""
  m = docs.chunk_size
  nll, toks, nbytes = [], [], []
  for d, t in enumerate(token_nll):
    n_chunks = int(docs.doc_offsets[d + 1] - docs.doc_offsets[d])
    padded = np.zeros(n_chunks * m)
    padded[:len(t)] = t
    counts = np.clip(len(t) - m * np.arange(n_chunks), 0, m)
    nll.append(padded.reshape(n_chunks, m).sum(axis=1))
    toks.append(counts)
    nbytes.append(docs.doc_bytes[d] * counts / max(len(t), 1))
  return np.concatenate(nll), np.concatenate(toks), np.concatenate(nbytes)


def _metrics(nll: float, tokens: int, nbytes: float) -> dict[str, Any]:
  return dict(tokens=int(tokens), bytes=int(round(nbytes)), nll_nats=float(nll),
              ppl=float(math.exp(nll / tokens)) if tokens else None,
              bpb=float(nll / math.log(2) / nbytes) if nbytes else None)


def summarize(name: str, k, token_nll: list[np.ndarray], docs: sources.EvalDocs,
              ratios: np.ndarray | None = None, alphas=leakage_lib.ALPHAS) -> dict[str, Any]:
  """One run's totals, per-document figures and (given r(C)) bpb(alpha)."""
  per_doc = []
  for d, t in enumerate(token_nll):
    row = _metrics(float(t.sum()), len(t), float(docs.doc_bytes[d]))
    row["key"] = docs.doc_keys[d]
    per_doc.append(row)
  total = _metrics(sum(float(t.sum()) for t in token_nll), sum(len(t) for t in token_nll),
                   float(np.sum(docs.doc_bytes)))
  run = dict(model=name, k=k, **total, documents=per_doc)
  if ratios is not None:
    c_nll, _, c_bytes = chunk_totals(token_nll, docs)
    run["bpb_alpha"] = leakage_lib.filtered_bpb(c_nll, c_bytes, ratios, alphas)
    run["bpb_buckets"] = leakage_lib.bucketed_bpb(c_nll, c_bytes, ratios)
  return run


def evaluate_contenders(contenders: Sequence[Contender], docs: sources.EvalDocs, eos_id: int,
                        settings: EvalSettings, table: sources.NeighborTable | None = None,
                        ratios: np.ndarray | None = None, store=None) -> list[dict[str, Any]]:
  """All runs: each retrieval model off and with each k; each baseline once.

  `settings.seq_len` and `settings.stride` must be set (resolved from the checkpoint).
  `store`: the database chunk store, needed for models that align or filter their
  neighbors (they read tokens around each retrieved chunk).
  """
  runs = []
  shown_for_copy = None  # what the first retrieval model reads at its training k
  for c in contenders:
    variants = []
    if not c.uses_retrieval:
      variants.append("-")
    else:
      if settings.retrieval_off or table is None:
        variants.append("off")
      if table is not None and settings.retrieval_on:
        variants += [k for k in settings.ks if k <= table.k]
    for k in variants:
      kk = k if isinstance(k, int) else 0
      shown = table
      if kk and not c.presentation.is_paper:
        if store is None:
          raise options_lib.SourceError(
              f"{c.name} was trained with aligned/filtered neighbors (align_neighbors, "
              "neighbor_min_match), which reads the database's tokens: pass --db_dir")
        ids, toks = align_lib.present(store, table.ids, docs.chunks, c.presentation, kk)
        shown = sources.NeighborTable(ids, toks, table.source)
      if shown_for_copy is None and kk and kk == (c.train_k or kk):
        shown_for_copy = (shown, kk)
      t = score_documents(c, docs, eos_id, settings, shown, kk, desc=f"{c.name} k={k}")
      run = summarize(c.name, k, t, docs, ratios, settings.alphas)
      logging.info("%s k=%s: ppl %.3f, bpb %.4f", c.name, k, run["ppl"], run["bpb"])
      runs.append(run)
      if not c.uses_retrieval and settings.copy_model and shown_for_copy is not None:
        runs.append(_copy_model_run(c, t, docs, shown_for_copy, ratios, settings))
  return runs


def _copy_model_run(baseline: Contender, token_nll, docs, shown, ratios, settings):
  """The training-free n-gram copy model over the neighbors, mixed with the baseline."""
  table, k = shown
  mixed = []
  for d, nll in enumerate(token_nll):
    lo, hi = int(docs.doc_offsets[d]), int(docs.doc_offsets[d + 1])
    mixed.append(copy_model_lib.mixed_token_nll(docs.tokens(d), nll, table.tokens[lo:hi, :k],
                                                docs.chunk_size))
  name = f"n-gram copy over {baseline.name}"
  run = summarize(name, f"copy{k}", mixed, docs, ratios, settings.alphas)
  logging.info("%s (k=%d, lambda %.2f): bpb %.4f", name, k, copy_model_lib.LAMBDA, run["bpb"])
  return run


def report_table(report: dict[str, Any]) -> str:
  """The runs as a text table (totals; bpb(alpha) when computed)."""
  runs = report["runs"]
  alphas = list(runs[0].get("bpb_alpha", {})) if runs else []
  head = ["model", "k", "tokens", "bytes", "ppl", "bpb"] + [f"bpb({a})" for a in alphas]
  rows = []
  for r in runs:
    row = [r["model"], str(r["k"]), str(r["tokens"]), str(r["bytes"]), f"{r['ppl']:.3f}",
           f"{r['bpb']:.4f}"]
    for a in alphas:
      v = r["bpb_alpha"][a]["bpb"]
      row.append("-" if v is None else f"{v:.4f}")
    rows.append(row)
  if alphas and runs:
    rows.append(["share of bytes", "", "", "", "", ""] + [
        f"{runs[0]['bpb_alpha'][a]['fraction_of_bytes']:.1%}" for a in alphas])
  return tables.format_table(head, rows)


def run_evaluation(workdir: str, *, settings: EvalSettings | None = None,
                   **options) -> dict[str, Any]:
  """`evaluate(EvalConfig(workdir, settings=settings, **options))`; `db_dir` names `db`."""
  if "db_dir" in options:
    options["db"] = options.pop("db_dir")
  return evaluate(EvalConfig(workdir=workdir, settings=settings or EvalSettings(), **options))


def evaluate(config: EvalConfig) -> dict[str, Any]:
  """The whole evaluation job; returns the report (also written to `config.output` as JSON)."""
  settings, neighbors_dir = config.settings, config.neighbors_dir
  # The model, and the database opened once: live retrieval over it (or over the service),
  # or the precomputed neighbors' database; checked against the checkpoint.
  session = session_lib.open_session(
      config.workdir, config.step, db=config.db, retrieval_url=config.retrieval_url,
      live=not neighbors_dir, service_timeout=config.service_timeout,
      check_contents=not config.skip_content_check)
  model, db, retriever = session.model, session.database, session.retriever
  db_manifest, db_name = session.manifest, session.source_name
  cfg = model.config
  m = cfg.chunk_size

  baseline = None
  if config.baseline_workdir:
    baseline = ckpt_lib.load_model(config.baseline_workdir, config.baseline_step,
                                   not config.skip_content_check)
    if model.data_provenance and baseline.data_provenance:  # both read the same tokens
      provenance.check_tokenizer(model.data_provenance["tokenizer"],
                                 baseline.data_provenance["tokenizer"],
                                 f"checkpoint {model.workdir}", f"checkpoint {baseline.workdir}")
    if db_manifest is not None and baseline.data_provenance:
      provenance.check(db_manifest, baseline.expected(baseline.config.uses_retrieval), db_name)

  # Evaluation documents.
  if config.eval_chunks:
    docs = sources.EvalDocs.from_store(config.eval_chunks, config.max_documents)
    eos_id = docs.manifest.get("eos_id")
    integrity.check_contents(stores=[chunk_store_lib.ChunkStore.open(config.eval_chunks)],
                             neighbors=[neighbors_dir] if neighbors_dir and db is not None
                             else [], skip=config.skip_content_check, job="evaluate")
  else:
    tok = session.tokenizer(config.tokenizer)
    docs = sources.EvalDocs.from_corpus(config.source, tok, m, config.text_field,
                                        config.max_documents)
    eos_id = tok.eos_id
  if eos_id is None:
    raise options_lib.SourceError("the evaluation data records no eos id")
  eval_name = f"evaluation data {docs.store_path or ''}".strip()
  provenance.check(docs.manifest, model.expected(), eval_name)
  if db_manifest is not None:
    provenance.check(docs.manifest, provenance.Expected(
        chunk_size=int(db_manifest["chunk_size"]), tokenizer=db_manifest.get("tokenizer"),
        source=db_name), eval_name)

  seq_len = settings.seq_len or int(model.train_config.get("seq_len") or 2048)
  stride = settings.stride or scoring.default_stride(seq_len, m)
  scoring.check_window_settings(seq_len, stride, m)

  warnings = []
  store = session.store
  matches = []
  if store is not None:
    matches = sources.find_in_database(docs, store)
    if matches:
      msg = (f"{len(matches)} of {docs.num_documents} evaluation documents also appear in the "
             f"database ({db_name}), e.g. {matches[0]['key']!r} ({matches[0]['reason']}): "
             "retrieval can copy them; see bpb(alpha), or pass --exclude_same_document")
      logging.warning(msg)
      warnings.append(msg)
  exclude = None
  if settings.exclude_same_document:
    if store is None:
      raise options_lib.SourceError("--exclude_same_document needs a local database (the "
                                "evaluation documents are matched against its documents)")
    exclude = sources.exclusion_ids(docs, matches)

  table = ratios = None
  k_needed = max(list(settings.ks) + ([leakage_lib.NUM_LEAKAGE_NEIGHBORS]
                                      if settings.leakage else []))
  if retriever is not None:
    table = sources.retrieve_table(retriever, docs, k_needed, exclude,
                                   progress=settings.progress)
  elif db is not None:
    table = sources.precomputed_table(neighbors_dir, db, docs, k_needed, exclude)
  if table is not None and settings.leakage:
    kl = min(leakage_lib.NUM_LEAKAGE_NEIGHBORS, table.k)
    ratios = leakage_lib.leakage_ratio(docs.chunks, table.tokens[:, :kl])
    full = _verbatim_documents(docs, ratios)
    if full:
      msg = (f"{len(full)} evaluation documents are copied verbatim by their neighbors "
             f"(every full chunk has r(C) = 1), e.g. {docs.doc_keys[full[0]]!r}")
      logging.warning(msg)
      warnings.append(msg)

  contenders = [Contender(model.name, scoring.retro_logits_fn(cfg), model.params,
                          cfg.uses_retrieval, align_lib.Presentation.of(cfg),
                          cfg.num_neighbors)]
  if baseline is not None:
    contenders.append(Contender(baseline.name, scoring.retro_logits_fn(baseline.config),
                                baseline.params, baseline.config.uses_retrieval))
  windows = dataclasses.replace(settings, seq_len=seq_len, stride=stride)
  runs = evaluate_contenders(contenders, docs, int(eos_id), windows, table, ratios,
                             store=store)
  report = {
      "checkpoint": {"workdir": model.workdir, "step": model.step},
      "baseline": ({"workdir": baseline.workdir, "step": baseline.step}
                   if baseline is not None else None),
      "data": {"source": docs.store_path or docs.manifest.get("source"),
               "documents": docs.num_documents, "chunks": docs.num_chunks,
               "tokens": int(sum(len(docs.tokens(d)) for d in range(docs.num_documents))),
               "bytes": int(np.sum(docs.doc_bytes))},
      "retrieval": ({"source": table.source, "k_retrieved": table.k,
                     "exclude_same_document": bool(settings.exclude_same_document)}
                    if table is not None else None),
      "protocol": {"seq_len": seq_len, "stride": stride, "chunk_size": m,
                   "first_token_context": "eos", "leakage_neighbors":
                   leakage_lib.NUM_LEAKAGE_NEIGHBORS if ratios is not None else None,
                   "chunk_bytes": "document bytes split in proportion to tokens"},
      "documents_in_database": matches,
      "leakage": ({"r": ratios.tolist(), "mean_r": float(ratios.mean())}
                  if ratios is not None else None),
      "warnings": warnings,
      "runs": runs,
  }
  if config.output:
    fileio.atomic_write_json(config.output, report)
  return report


def _verbatim_documents(docs: sources.EvalDocs, ratios: np.ndarray) -> list[int]:
  """Documents whose every full chunk is copied whole by a neighbor (r(C) = 1)."""
  full = (np.asarray(docs.chunks) >= 0).all(axis=1)
  out = []
  for d in range(docs.num_documents):
    sl = slice(docs.doc_offsets[d], docs.doc_offsets[d + 1])
    r = ratios[sl][full[sl]]
    if len(r) and np.all(r >= 1.0):
      out.append(d)
  return out
