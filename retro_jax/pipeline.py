"""The end-to-end pipeline behind the quickstart and the experiments.

corpus split -> SentencePiece tokenizer -> retrieval database (chunk store, BERT embeddings,
ScaNN index) -> precomputed neighbors (training split, and the held-out split against the
database) -> RETRO and baseline training -> evaluation.

Every stage writes under one work directory and is skipped or resumed when its finished
output is already there, so a killed run continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import sys
import sysconfig
from typing import Sequence

from absl import logging

from retro_jax import config as config_lib
from retro_jax import fileio
from retro_jax import quickstart_config
from retro_jax import reporting
from retro_jax.evaluation import evaluate as evaluate_lib
from retro_jax.retrieval.jobs import build as build_db_lib
from retro_jax.retrieval.jobs import precompute as pn
from retro_jax.retrieval.store import align as align_lib
from retro_jax.retrieval.store import chunk_store as chunk_store_lib
from retro_jax.retrieval.store import corpus as corpus_lib
from retro_jax.retrieval.store import tokenizer as tokenizer_lib
from retro_jax.training import train_config as tc
from retro_jax.training import trainer

# The plots and tables moved to reporting.py, the settings to quickstart_config.py; these
# names stay importable here (experiments/*.py use them).
comparison_table = reporting.comparison_table
format_table = reporting.format_table
plot_curves = reporting.plot_curves
pyplot = reporting.pyplot
read_metrics = reporting.read_metrics
save_figure = reporting.save_figure
PipelineError = quickstart_config.PipelineError
QuickstartConfig = quickstart_config.QuickstartConfig

EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__", "idlelib/Icons")


def stdlib_root() -> str:
  """The Python standard library sources: text every machine with Python has."""
  return sysconfig.get_paths()["stdlib"]


def transformers_models_root() -> str:
  """The installed `transformers` package's model sources (a dependency, so on every install).

  Its ~550 model directories reuse each other's code heavily: the `modeling_*.py` files are
  generated from `modular_*.py` files that import from other models, and "Copied from"
  blocks remain, so a held-out model's code is largely present in other models' files.
  """
  import transformers  # pylint: disable=g-import-not-at-top  (seconds to import; only this corpus needs it)
  return os.path.join(os.path.dirname(transformers.__file__), "models")


CORPORA = {"transformers": (transformers_models_root, ("modeling_*.py",), "directory"),
           "stdlib": (stdlib_root, (".py",), "file")}
assert set(CORPORA) == set(quickstart_config.CORPUS_NAMES)


def _split_key(rel: str, seed: int) -> int:
  return int(hashlib.sha1(f"{seed}:{rel}".encode()).hexdigest()[:8], 16)


def _matches(name: str, patterns: Sequence[str]) -> bool:
  """A file name against suffixes (".py") or glob patterns ("modeling_*.py")."""
  return any(fnmatch.fnmatch(name, p) if any(ch in p for ch in "*?[") else name.endswith(p)
             for p in patterns)


def list_files(root: str, suffixes: Sequence[str]) -> list[str]:
  """Relative paths of files under root whose names end with one of `suffixes` (or match it,
  for a glob such as "modeling_*.py"), sorted, excluding caches and installed third-party
  packages."""
  if not os.path.isdir(root):
    raise PipelineError(f"corpus root {root} is not a directory")
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    rel_dir = os.path.relpath(dirpath, root)
    dirnames[:] = sorted(d for d in dirnames if not any(
        os.path.normpath(os.path.join(rel_dir, d)).endswith(x) or d == x
        for x in EXCLUDED_DIRS))
    for name in sorted(filenames):
      if _matches(name, suffixes):
        out.append(os.path.normpath(os.path.join(rel_dir, name)))
  if not out:
    raise PipelineError(f"no {'/'.join(suffixes)} files under {root}")
  return sorted(out)


@dataclasses.dataclass(frozen=True)
class Split:
  train_jsonl: str
  eval_jsonl: str
  num_train: int
  num_eval: int
  train_bytes: int
  eval_bytes: int


@dataclasses.dataclass(frozen=True)
class SplitSettings:
  """How `split_corpus` splits (all of it is recorded: a change re-splits)."""
  suffixes: tuple[str, ...] = (".py",)  # file name endings or globs taken from the tree
  eval_percent: float = 5.0             # share of files (or directories) held out
  max_train_bytes: int | None = None    # byte budgets of the two splits (None: no limit)
  max_eval_bytes: int | None = None
  seed: int = 0
  split_by: str = "file"                # held-out unit: "file" or "directory"
  twin_eval: bool = False               # also put each held-out document into training

  def __post_init__(self):
    if self.split_by not in ("file", "directory"):
      raise PipelineError(f"split_by must be 'file' or 'directory', got {self.split_by!r}")
    object.__setattr__(self, "suffixes", tuple(self.suffixes))


def split_corpus(root: str, out_dir: str, **settings) -> Split:
  """Splits the files under `root` into train and held-out JSON Lines, deterministically.

  `settings` are SplitSettings' fields.  split_by="file": a file goes to the held-out split
  when a hash of its path falls below `eval_percent`; "directory": the hash is of its
  top-level directory, so all files of one directory (one model of `transformers`) land on
  the same side and a held-out document's siblings are never in the database.

  twin_eval=True also writes every held-out document into the training split under the key
  "twin/<key>" (the pipeline copy check: each held-out chunk's exact copy is in the
  database, so a model that reads its neighbors can copy it).
  Within each split files are taken in hash order (a deterministic random subset) until the
  byte budget is reached.  Files that are not UTF-8 or are empty are left out here (the
  corpus readers would skip them too).  Written atomically; reused when present and made
  with the same settings.
  """
  opts = SplitSettings(**settings)
  suffixes, seed, split_by = opts.suffixes, opts.seed, opts.split_by
  settings = dict(dataclasses.asdict(opts), root=os.path.abspath(root),
                  suffixes=list(suffixes))
  os.makedirs(out_dir, exist_ok=True)
  meta_path = os.path.join(out_dir, "split.json")
  if os.path.exists(meta_path):
    meta = json.load(open(meta_path))
    if meta["settings"] == settings:
      return Split(**meta["split"])
    logging.info("corpus split settings changed; re-splitting %s", out_dir)
  files = list_files(root, suffixes)
  order = sorted(files, key=lambda rel: _split_key(rel, seed))
  cut = opts.eval_percent / 100.0 * 16 ** 8
  budgets = {"train": opts.max_train_bytes, "eval": opts.max_eval_bytes}
  rows = {"train": [], "eval": []}
  used = {"train": 0, "eval": 0}
  for rel in order:
    group = rel.split(os.sep)[0] if split_by == "directory" and os.sep in rel else rel
    split = "eval" if _split_key(group, seed + 1) < cut else "train"
    try:
      with open(os.path.join(root, rel), "rb") as f:
        text = f.read().decode("utf-8")
    except (UnicodeDecodeError, OSError):
      continue
    if not text.strip():
      continue
    size = len(text.encode("utf-8"))
    budget = budgets[split]
    if budget is not None and used[split] + size > budget:
      continue
    rows[split].append({"id": rel, "text": text})
    used[split] += size
  if not rows["train"] or not rows["eval"]:
    raise PipelineError(f"the split of {root} left an empty train or eval set "
                        f"({len(rows['train'])} / {len(rows['eval'])} files): raise the byte "
                        "budgets or eval_percent")
  if opts.twin_eval:
    rows["train"] += [{"id": "twin/" + r["id"], "text": r["text"]} for r in rows["eval"]]
    used["train"] += used["eval"]
  paths = {}
  for split, items in rows.items():
    path = os.path.join(out_dir, f"{split}.jsonl")
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items).encode("utf-8")
    fileio.atomic_write_bytes(path, data)
    paths[split] = path
  result = Split(train_jsonl=paths["train"], eval_jsonl=paths["eval"],
                 num_train=len(rows["train"]), num_eval=len(rows["eval"]),
                 train_bytes=used["train"], eval_bytes=used["eval"])
  fileio.atomic_write_json(meta_path, {"settings": settings,
                                       "split": dataclasses.asdict(result)})
  return result


def train_tokenizer(train_jsonl: str, out_dir: str, vocab_size: int) -> str:
  """SentencePiece on the training split (reused when already trained with this vocab)."""
  prefix = os.path.join(out_dir, f"spm{vocab_size}")
  model = prefix + ".model"
  if os.path.exists(model):
    return model
  os.makedirs(out_dir, exist_ok=True)
  texts = corpus_lib.texts(corpus_lib.iter_documents(train_jsonl))
  return tokenizer_lib.train_sentencepiece(texts, prefix, vocab_size, model_type="bpe")


@dataclasses.dataclass(frozen=True)
class Data:
  """Everything training and evaluation read."""
  db_dir: str
  tokenizer: str
  eval_chunks: str
  train_neighbors: str
  eval_neighbors: str


def build_data(split: Split, work: str, *, vocab_size: int, chunk_size: int,
               num_neighbors: int, eval_neighbors: int, bert: str | None = None,
               embed_batch_size: int = 64, tokenizer: str | None = None) -> Data:
  """Tokenizer (trained here unless `tokenizer` names one), database, held-out chunk store
  and both neighbor files (all resumable)."""

  tok_path = tokenizer or train_tokenizer(split.train_jsonl, os.path.join(work, "tokenizer"),
                                          vocab_size)
  db_dir = os.path.join(work, "db")
  if not os.path.exists(os.path.join(db_dir, fileio.MANIFEST)):
    build_db_lib.build_database(split.train_jsonl, tok_path, db_dir, chunk_size=chunk_size,
                                bert=bert, embed_batch_size=embed_batch_size)
  eval_chunks = os.path.join(work, "eval_chunks")
  chunk_store_lib.build_chunk_store(corpus_lib.Corpus(split.eval_jsonl),
                                    tokenizer_lib.load_tokenizer(tok_path), eval_chunks,
                                    chunk_size)
  train_nb = os.path.join(work, "neighbors", "train")
  if not os.path.exists(os.path.join(train_nb, fileio.MANIFEST)):
    pn.precompute_neighbors(db_dir, train_nb, k=num_neighbors)
  eval_nb = os.path.join(work, "neighbors", "eval")
  if not os.path.exists(os.path.join(eval_nb, fileio.MANIFEST)):
    pn.precompute_neighbors(db_dir, eval_nb, k=eval_neighbors, query_store=eval_chunks,
                            exclude_same_document=False)
  return Data(db_dir=db_dir, tokenizer=tok_path, eval_chunks=eval_chunks,
              train_neighbors=train_nb, eval_neighbors=eval_nb)


@dataclasses.dataclass(frozen=True)
class TrainRun:
  """The settings of one pipeline training run (the rest is train_config's defaults)."""
  preset: str
  steps: int
  seq_len: int
  batch_size: int
  learning_rate: float
  warmup_steps: int
  eval_every: int
  eval_batches: int
  vocab_size: int
  seed: int = 0


def train_config(data: Data, *, retrieval: bool, overrides: dict | None = None, **run):
  """A training ConfigDict over the pipeline's data; `run` are TrainRun's fields, and
  `overrides` maps dotted config keys ("model.copy_head") to values."""
  r = TrainRun(**run)
  preset, steps, seq_len, batch_size = r.preset, r.steps, r.seq_len, r.batch_size
  learning_rate, warmup_steps, eval_every = r.learning_rate, r.warmup_steps, r.eval_every
  eval_batches, vocab_size, seed = r.eval_batches, r.vocab_size, r.seed
  c = tc.default_config()
  c.model.preset = preset
  c.model.vocab_size = vocab_size
  c.retrieval = retrieval
  c.data.db_dir = data.db_dir
  c.data.neighbors_dir = data.train_neighbors if retrieval else ""
  c.data.eval_chunks_dir = data.eval_chunks
  c.data.eval_neighbors_dir = data.eval_neighbors if retrieval else ""
  c.seq_len = seq_len
  c.batch_size = batch_size
  c.num_steps = steps
  c.optimizer.learning_rate = learning_rate
  c.optimizer.warmup_steps = warmup_steps
  c.eval_every = eval_every
  c.eval_batches = eval_batches
  c.log_every = max(1, min(25, steps // 10))
  c.checkpoint_every = max(eval_every, 50)
  c.keep_checkpoints = 2
  c.seed = seed
  for key, value in (overrides or {}).items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def train(cfg, run_dir: str) -> dict:
  """Trains (or resumes, or skips when finished) one run; returns the trainer's summary."""
  return trainer.train_and_evaluate(cfg, run_dir)


def evaluate_pair(data: Data, retro_run: str, baseline_run: str, *, ks: Sequence[int],
                  output: str, seq_len: int | None = None, progress: bool = True) -> dict:
  """The evaluation CLI's library call: RETRO (off and each k) and the baseline, with
  leakage-filtered bpb, on the held-out chunk store with its precomputed neighbors."""
  settings = evaluate_lib.EvalSettings(ks=tuple(ks), seq_len=seq_len, progress=progress)
  return evaluate_lib.run_evaluation(
      retro_run, eval_chunks=data.eval_chunks, db_dir=data.db_dir,
      neighbors_dir=data.eval_neighbors, baseline_workdir=baseline_run, settings=settings,
      output=output)


def check_workdir_data(workdir: str, settings: dict) -> None:
  """A rerun must build its data as the first run did: the database and neighbors are reused
  when present, so different data settings would silently mix old and new data."""
  path = os.path.join(workdir, "data_settings.json")
  if os.path.exists(path):
    old = fileio.read_json(path)
    if "corpus_version" not in old and "corpus_version" in settings:
      # Workdirs from before the version was recorded: this run's is recorded, not compared.
      old["corpus_version"] = settings["corpus_version"]
      fileio.atomic_write_json(path, old)
    changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if changed:
      what = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in changed)
      raise PipelineError(f"{workdir} was built with other data settings ({what}): use "
                          "another --workdir, or delete this one")
    return
  fileio.atomic_write_json(path, settings)


def run_quickstart(**settings) -> dict:
  """`quickstart(QuickstartConfig(**settings))`."""
  return quickstart(QuickstartConfig(**settings))


def corpus_source(config: QuickstartConfig) -> tuple[str, tuple[str, ...], str]:
  """(root, file suffixes, split unit) of the quickstart's corpus."""
  if config.corpus_root:
    root, suffixes, split_by = config.corpus_root, (".py",), "file"
  else:
    root_fn, suffixes, split_by = CORPORA[config.corpus]
    root = root_fn()
  return root, tuple(config.suffixes or suffixes), config.split_by or split_by


def corpus_version(config: QuickstartConfig) -> str:
  """Which text the corpus is: the held-out set depends on the installed version."""
  if config.corpus_root:
    return f"directory {os.path.abspath(config.corpus_root)}"
  if config.corpus == "transformers":
    import transformers  # pylint: disable=g-import-not-at-top
    return f"transformers {transformers.__version__} (modeling_*.py)"
  return f"Python {sys.version.split()[0]} standard library"


def retrofit_cca_layers(num_layers: int) -> tuple[int, ...]:
  """CCA in three upper layers of a pretrained decoder, 6 apart (18, 24, 30 for 30 layers):
  the backward pass then runs through the top of the frozen decoder only."""
  return tuple(sorted({max(1, num_layers - 12), max(1, num_layers - 6), num_layers}))


def pretrained_lm(path: str) -> tuple[config_lib.RetroConfig, str]:
  """(model config, tokenizer file) of a `retro-import-lm` workdir, or a PipelineError."""
  tok_dir = os.path.join(path, "tokenizer")
  toks = sorted(os.listdir(tok_dir)) if os.path.isdir(tok_dir) else []
  if not os.path.isdir(os.path.join(path, "checkpoints")) or not toks:
    raise PipelineError(f"--lm={path} is not a pretrained-LM workdir (no checkpoints/ or "
                        "tokenizer/): make one with retro-import-lm --source=MODEL "
                        "--output=DIR")
  try:
    model = trainer.saved_model_config(path, what="--lm")
  except FileNotFoundError as e:
    raise PipelineError(str(e)) from None
  return model, os.path.join(tok_dir, toks[0])


def _model_plan(config: QuickstartConfig):
  """(RETRO model config, its overrides of the preset, the pretrained LM's config or None,
  its tokenizer or None): the quickstart's small RETRO, or with --lm the `retrofit` recipe's
  reading options over the LM's decoder."""
  model_overrides = dict(config.model_overrides or {})
  lm_model, lm_tokenizer = pretrained_lm(config.lm) if config.lm else (None, None)
  try:
    if lm_model:
      model_overrides = dict(dict(cca_layers=retrofit_cca_layers(lm_model.num_layers),
                                  neighbor_min_match=max(1, lm_model.chunk_size // 4)),
                             **model_overrides)
      model = config_lib.get_preset(_retrofit_recipe().model.preset, **{
          **model_overrides, **{f: getattr(lm_model, f) for f in trainer.DECODER_FIELDS}})
    else:
      model = config_lib.get_preset(config.preset, vocab_size=config.vocab_size,
                                    **model_overrides)
  except config_lib.ConfigError as e:
    raise PipelineError(str(e)) from None
  if not model.uses_retrieval:
    raise PipelineError(f"preset {config.preset!r} has no retrieval; pick a RETRO preset")
  return model, model_overrides, lm_model, lm_tokenizer


def _retrofit_recipe():
  from retro_jax.configs import retrofit as retrofit_config  # pylint: disable=g-import-not-at-top
  return retrofit_config.get_config()


def _train_models(config: QuickstartConfig, data: Data, runs: dict[str, str], steps: int,
                  vocab_size: int, model_overrides: dict, stage) -> None:
  """Stages 3 and 4: RETRO and its baseline trained alike, or (--lm) the LM RETRO-fitted
  with the `retrofit` recipe and the LM itself as the baseline."""
  overrides = {f"model.{k}": v for k, v in model_overrides.items()}
  schedule = dict(steps=steps, warmup_steps=max(1, steps // 10),
                  eval_every=max(1, steps // 6), eval_batches=4, vocab_size=vocab_size,
                  seed=config.seed)
  if config.lm:
    recipe = _retrofit_recipe()
    overrides.update({"retrofit.checkpoint": os.path.abspath(config.lm),
                      "retrofit.inherit_decoder": True})
    stage(f"3/5 RETRO-fit {config.lm} for {steps} steps (decoder frozen)")
    train(train_config(data, retrieval=True, preset=recipe.model.preset,
                       seq_len=recipe.seq_len, batch_size=recipe.batch_size,
                       learning_rate=recipe.optimizer.learning_rate, overrides=overrides,
                       **schedule), runs["RETRO"])
    stage("4/5 the baseline is the pretrained LM itself: nothing to train")
    return
  for i, (name, retrieval) in enumerate((("RETRO", True), ("baseline", False))):
    stage(f"{3 + i}/5 train {name} for {steps} steps")
    train(train_config(data, retrieval=retrieval, preset=config.preset,
                       seq_len=config.seq_len, batch_size=config.batch_size,
                       learning_rate=config.learning_rate, overrides=overrides, **schedule),
          runs[name])


def quickstart(config: QuickstartConfig) -> dict:
  """Everything the quickstart does (see retro_jax/quickstart.py); returns the table, the
  results per model and the artefacts' paths."""
  workdir, scale, seed, bert = config.workdir, config.scale, config.seed, config.bert or None
  corpus_root, suffixes, split_by = corpus_source(config)
  model, model_overrides, lm_model, lm_tokenizer = _model_plan(config)
  vocab_size = lm_model.vocab_size if lm_model else config.vocab_size
  os.makedirs(workdir, exist_ok=True)
  check_workdir_data(workdir, dict(
      corpus_root=os.path.abspath(corpus_root), suffixes=list(suffixes), split_by=split_by,
      twin_eval=bool(config.twin_eval), eval_percent=config.eval_percent, scale=scale,
      train_bytes=config.train_bytes, eval_bytes=config.eval_bytes, seed=seed,
      vocab_size=vocab_size, chunk_size=model.chunk_size, bert=bert,
      corpus_version=corpus_version(config),
      **({"lm": os.path.abspath(config.lm)} if config.lm else {})))
  steps = max(1, int(round(config.steps * scale)))
  stage = lambda name: logging.info("=== quickstart: %s ===", name)

  stage(f"1/5 split the corpus by {split_by}")
  split = split_corpus(corpus_root, os.path.join(workdir, "corpus"), suffixes=suffixes,
                       max_train_bytes=int(config.train_bytes * scale),
                       max_eval_bytes=int(config.eval_bytes * max(1.0, scale ** 0.5)),
                       seed=seed, split_by=split_by, twin_eval=config.twin_eval,
                       eval_percent=config.eval_percent)
  logging.info("train: %d files, %d bytes; held-out: %d files, %d bytes", split.num_train,
               split.train_bytes, split.num_eval, split.eval_bytes)

  stage("2/5 tokenizer, retrieval database, neighbors")
  # A filter may drop neighbors: retrieve candidates to replace them (align.CANDIDATES).
  train_k = model.num_neighbors
  if model.neighbor_min_match:
    train_k = max(train_k, align_lib.CANDIDATES)
  data = build_data(split, workdir, vocab_size=vocab_size,
                    chunk_size=model.chunk_size, num_neighbors=train_k,
                    eval_neighbors=max(10, *config.eval_k), bert=bert,
                    tokenizer=lm_tokenizer)

  runs = {"RETRO": os.path.join(workdir, "runs", "retro"),
          "baseline": (os.path.abspath(config.lm) if lm_model
                       else os.path.join(workdir, "runs", "baseline"))}
  _train_models(config, data, runs, steps, vocab_size, model_overrides, stage)

  stage("5/5 evaluate both on the held-out documents")
  report = evaluate_pair(data, runs["RETRO"], runs["baseline"], ks=config.eval_k,
                         output=os.path.join(workdir, "evaluation.json"))
  table, results = comparison_table(report)
  artifacts = {"evaluation report": os.path.join(workdir, "evaluation.json"),
               "retrieval database": data.db_dir, "RETRO run": runs["RETRO"],
               "baseline run": runs["baseline"],
               "held-out bits/byte curves": plot_curves(
                   runs, os.path.join(workdir, "bpb_curves.png"))}
  recorded = fileio.read_json(os.path.join(workdir, "data_settings.json"))["corpus_version"]
  corpus_line = (f"corpus: {recorded}; {split.num_train} files in the database, "
                 f"{split.num_eval} held out")
  fileio.atomic_write_bytes(os.path.join(workdir, "summary.txt"),
                            (corpus_line + "\n" + table + "\n").encode())
  return dict(table=table, results=results, artifacts=artifacts, corpus=corpus_line)
