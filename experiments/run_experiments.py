r"""The small-scale replication experiments of issue 6, on a finished quickstart work directory.

Run the quickstart (or a longer one) first; every experiment here reads its database, held-out
documents and the two trained runs, and writes results/<name>.json, a Markdown table
results/<name>.md and a plot results/<name>.png.  Every stage is resumable (finished
databases, neighbor files and runs are reused).

  python -m retro_jax.quickstart --workdir=W --steps=600
  python experiments/run_experiments.py --workdir=W --experiment=neighbors_k   # k = 1,2,5,10
  python experiments/run_experiments.py --workdir=W --experiment=db_size      # 1/10/100 %
  python experiments/run_experiments.py --workdir=W --experiment=retrofit --retrofit_steps=150
  python experiments/run_experiments.py --workdir=W --experiment=gain --name=gain_stdlib

`gain` tabulates the quickstart's own evaluation (RETRO vs baseline, leakage-filtered) and
copies its bits-per-byte curves; `neighbors_k` evaluates the trained RETRO with k neighbors
(paper Fig. 4 / §4.1: gains grow up to k ~ 10 for small models); `db_size` evaluates the same
RETRO against databases made of 1%, 10% and 100% of the training documents
(`build_lib.subset_database`, same embeddings, nested subsets; paper Table 4 / Fig. 1);
`retrofit` freezes the trained baseline, adds an encoder and CCA and trains only those for
`--retrofit_steps` (paper §4.2), then evaluates it next to RETRO trained from scratch.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from retro_jax import fileio as manifest_lib  # pylint: disable=wrong-import-position
from retro_jax import pipeline  # pylint: disable=wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished quickstart work directory (every "
                               "experiment but overlap).")
EXPERIMENTS = ("gain", "neighbors_k", "db_size", "retrofit", "overlap", "baselines", "curves")
_EXPERIMENT = flags.DEFINE_enum("experiment", None, list(EXPERIMENTS), "Which experiment.",
                                required=True)
_NAME = flags.DEFINE_string("name", None, "Result file stem (default: the experiment name).")
_KS = flags.DEFINE_list("ks", ["1", "2", "5", "10"], "neighbors_k: neighbor counts.")
_FRACTIONS = flags.DEFINE_list("fractions", ["0.01", "0.1", "1"],
                               "db_size: database sizes as fractions of the training "
                               "documents; above 1, the training documents plus unused "
                               "documents of the same corpus (never the held-out ones).")
_K = flags.DEFINE_integer("k", 2, "db_size: neighbors at evaluation.")
_RETROFIT_STEPS = flags.DEFINE_integer("retrofit_steps", 150, "retrofit: training steps.")
_LR = flags.DEFINE_float("learning_rate", 2e-3, "retrofit: peak learning rate.")
_CORPORA = flags.DEFINE_list("corpora", None, "overlap: NAME=WORKDIR pairs, one finished "
                             "quickstart work directory per corpus (NAME from CORPORA).")
_SIZES = flags.DEFINE_list("sizes", ["2x", "4x"], "baselines: larger baselines (BASELINE_SIZES).")
_CURVE_STEPS = flags.DEFINE_integer("curve_steps", 2000, "curves: training steps per model.")
_CURVE_EVERY = flags.DEFINE_integer("curve_every", 100, "curves: steps between held-out "
                                    "evaluations.")
_CURVE_BATCHES = flags.DEFINE_integer("curve_batches", 32, "curves: held-out batches per "
                                      "periodic evaluation.")
_CURVE_MODELS = flags.DEFINE_list("curve_models", ["RETRO", "baseline"], "curves: the models "
                                   "this process trains: RETRO, baseline, baseline_2x, "
                                   "baseline_4x (the larger ones on the same schedule; one "
                                   "process per model, so a partial report has RETRO and "
                                   "baseline at every step).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "curves: tabulate what the runs have "
                                 "logged so far (partial results, step counts stated) "
                                 "without training.")
_OUT = flags.DEFINE_string("results_dir", os.path.join(HERE, "results"),
                           "Where results are written.")


def _data(work: str, db_dir: str | None = None, eval_nb: str | None = None) -> pipeline.Data:
  tok_dir = os.path.join(work, "tokenizer")
  models = [f for f in sorted(os.listdir(tok_dir)) if f.endswith(".model")]
  if not models:
    raise pipeline.PipelineError(f"{work} holds no trained tokenizer: run the quickstart first")
  return pipeline.Data(db_dir=db_dir or os.path.join(work, "db"),
                       tokenizer=os.path.join(tok_dir, models[0]),
                       eval_chunks=os.path.join(work, "eval_chunks"),
                       train_neighbors=os.path.join(work, "neighbors", "train"),
                       eval_neighbors=eval_nb or os.path.join(work, "neighbors", "eval"))


def _runs(work: str) -> dict[str, str]:
  runs = {"RETRO": os.path.join(work, "runs", "retro"),
          "baseline": os.path.join(work, "runs", "baseline")}
  for name, path in runs.items():
    if not os.path.isdir(os.path.join(path, "checkpoints")):
      raise pipeline.PipelineError(f"{name} run {path} has no checkpoints: run the quickstart "
                                   f"with --workdir={work} first")
  return runs


def _row(run: dict) -> dict:
  alpha = run.get("bpb_alpha", {}).get(pipeline.QUICKSTART_ALPHA, {})
  return {"model": run["model"], "k": run["k"], "ppl": run["ppl"], "bpb": run["bpb"],
          "bpb_alpha_0125": alpha.get("bpb"), "alpha_fraction_of_bytes":
          alpha.get("fraction_of_bytes")}


def _evaluate(work: str, data: pipeline.Data, ks, output: str, retro_run: str | None = "",
              baseline_run: str | None = "") -> dict:
  """An evaluation report, cached in `output`; "" = the quickstart's run, None = no run."""
  runs = _runs(work)
  if os.path.exists(output):
    return json.load(open(output))
  return pipeline.evaluate_pair(data, runs["RETRO"] if retro_run == "" else retro_run,
                                runs["baseline"] if baseline_run == "" else baseline_run,
                                ks=ks, output=output, progress=False)


def _plot(xs, series: dict[str, list], path: str, xlabel: str, logx=False, hline=None):
  plt = pipeline.pyplot()
  if plt is None:
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, ys in series.items():
    ax.plot(xs, ys, marker="o", label=label)
  if hline is not None:
    ax.axhline(hline[1], color="gray", ls="--", label=hline[0])
  if logx:
    ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel("held-out bits per byte")
  ax.grid(alpha=0.3)
  ax.legend()
  return pipeline.save_figure(fig, path)


def _write(name: str, result: dict, table: str) -> None:
  os.makedirs(_OUT.value, exist_ok=True)
  manifest_lib.atomic_write_json(os.path.join(_OUT.value, name + ".json"), result)
  with open(os.path.join(_OUT.value, name + ".md"), "w") as f:
    f.write(table + "\n")
  print(table)


def _baseline_bpb(report) -> tuple[float, float | None]:
  base = [r for r in report["runs"] if r["k"] == "-"][0]
  return base["bpb"], _row(base)["bpb_alpha_0125"]


def gain(work: str, name: str) -> None:
  report = json.load(open(os.path.join(work, "evaluation.json")))
  table, results = pipeline.comparison_table(report)
  curves = {label: pipeline.read_metrics(path, "eval") for label, path in _runs(work).items()}
  steps = sorted({r["step"] for r in curves["RETRO"]} & {r["step"] for r in curves["baseline"]})
  by_step = {label: {r["step"]: r["bits_per_byte"] for r in rows}
             for label, rows in curves.items()}
  curve_table = pipeline.format_table(
      ["step", "RETRO bpb (4 held-out batches)", "baseline bpb", "RETRO / baseline"],
      [[s, by_step["RETRO"][s], by_step["baseline"][s],
        by_step["RETRO"][s] / by_step["baseline"][s]] for s in steps])
  png = os.path.join(_OUT.value, name + "_curves.png")
  pipeline.plot_curves(_runs(work), png)
  _write(name, {"workdir": work, "results": results, "curves": by_step,
                "data": report["data"]}, table + "\n\n" + curve_table)


def neighbors_k(work: str, name: str) -> None:
  ks = [int(k) for k in _KS.value]
  report = _evaluate(work, _data(work), ks, os.path.join(work, f"eval_{name}.json"))
  rows = [_row(r) for r in report["runs"]]
  base_bpb, base_alpha = _baseline_bpb(report)
  label = lambda k: {"-": "baseline", "off": "retrieval off"}.get(  # pylint: disable=unnecessary-lambda-assignment
      str(k), f"baseline + n-gram copy, k={str(k)[4:]}" if str(k).startswith("copy") else
      f"k={k}")
  table = pipeline.format_table(
      ["RETRO evaluated with", "bits/byte", "RETRO / baseline", "bits/byte, r(C)<=0.125"],
      [[label(r["k"]), r["bpb"], r["bpb"] / base_bpb,
        r["bpb_alpha_0125"] if r["bpb_alpha_0125"] is not None else "-"] for r in rows])
  retro = {int(r["k"]): r["bpb"] for r in rows if str(r["k"]).isdigit()}
  _plot(sorted(retro), {"RETRO": [retro[k] for k in sorted(retro)]},
        os.path.join(_OUT.value, name + ".png"), "neighbors k at evaluation",
        hline=("baseline", base_bpb))
  _write(name, {"workdir": work, "rows": rows}, table)


def _extended_database(work: str, frac: float) -> str:
  """A database `frac` (> 1) times the training documents' bytes: the training documents plus
  documents of the same corpus that the split left unused, never one on the held-out side
  (for a split by directory, no file of a held-out directory).  Same tokenizer and embedder."""
  from retro_jax.retrieval.jobs import build as build_lib  # pylint: disable=g-import-not-at-top
  db_dir = os.path.join(work, "db_extended", f"{frac:g}")
  if os.path.exists(os.path.join(db_dir, manifest_lib.MANIFEST)):
    return db_dir
  meta = manifest_lib.read_json(os.path.join(work, "corpus", "split.json"))
  st, train_jsonl = meta["settings"], os.path.join(work, "corpus", "train.jsonl")
  used = {json.loads(line)["id"] for line in open(train_jsonl, encoding="utf-8")}
  cut = st["eval_percent"] / 100.0 * 16 ** 8
  budget = (frac - 1.0) * meta["split"]["train_bytes"]
  rows, total = [], 0
  for rel in sorted(pipeline.list_files(st["root"], st["suffixes"]),
                    key=lambda r: pipeline._split_key(r, st["seed"])):  # pylint: disable=protected-access
    group = rel.split(os.sep)[0] if st["split_by"] == "directory" and os.sep in rel else rel
    if rel in used or pipeline._split_key(group, st["seed"] + 1) < cut:  # pylint: disable=protected-access
      continue
    try:
      text = open(os.path.join(st["root"], rel), "rb").read().decode("utf-8")
    except (UnicodeDecodeError, OSError):
      continue
    if not text.strip() or total + len(text.encode("utf-8")) > budget:
      continue
    rows.append({"id": rel, "text": text})
    total += len(text.encode("utf-8"))
  if total < 0.5 * budget:
    raise ExperimentError(f"the corpus {st['root']} has only {total} unused bytes, not the "
                          f"{budget:.0f} a {frac:g}x database needs: pick a smaller fraction")
  extra = os.path.join(work, "corpus", f"extra_{frac:g}.jsonl")
  manifest_lib.atomic_write_bytes(extra, "".join(
      json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
  src = manifest_lib.read_manifest(os.path.join(work, "db"))
  build_lib.build_database([train_jsonl, extra], _data(work).tokenizer, db_dir,
                          chunk_size=int(src["chunk_size"]), bert=src["embedder_source"],
                          embed_batch_size=64)
  return db_dir


def db_size(work: str, name: str) -> None:
  from retro_jax.retrieval.embed import hashing as hashing_lib
  from retro_jax.retrieval.jobs import build as build_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.jobs import precompute as pn  # pylint: disable=g-import-not-at-top
  embedder = hashing_lib.load_embedder(
      manifest_lib.read_manifest(os.path.join(work, "db"))["embedder_source"])
  rows = []
  for frac in sorted(float(f) for f in _FRACTIONS.value):
    if frac > 1.0:
      db_dir = _extended_database(work, frac)
    elif frac == 1.0:
      db_dir = os.path.join(work, "db")
    else:
      db_dir = os.path.join(work, "db_subsets", f"{frac:g}")
      if not os.path.exists(os.path.join(db_dir, manifest_lib.MANIFEST)):
        build_lib.subset_database(os.path.join(work, "db"), db_dir, frac)
    nb = os.path.join(work, "neighbors", "eval" if frac == 1.0 else f"eval_db{frac:g}")
    if not os.path.exists(os.path.join(nb, manifest_lib.MANIFEST)):
      # The held-out chunks are embedded as the full database's were (a subset database
      # copies its source's vectors and records no embedder of its own).
      pn.precompute_neighbors(db_dir, nb, k=10, query_store=os.path.join(work, "eval_chunks"),
                              exclude_same_document=False, embedder=embedder)
    data = _data(work, db_dir=db_dir, eval_nb=nb)
    # The baseline is scored with every database too: the leakage filter r(C) <= alpha
    # depends on the database, so each row's filtered subset is its own.
    report = _evaluate(work, data, [_K.value], os.path.join(work, f"eval_{name}_{frac:g}.json"))
    base = _baseline_bpb(report)
    man = manifest_lib.read_manifest(db_dir)
    for r in report["runs"]:
      if r["k"] == _K.value:
        rows.append(dict(_row(r), fraction=frac, chunks=man["num_chunks"],
                         documents=man["num_documents"], baseline_bpb=base[0],
                         baseline_bpb_alpha_0125=base[1],
                         tokens=int(man["num_chunks"]) * int(man["chunk_size"])))
  table = pipeline.format_table(
      ["database", "chunks", "RETRO bits/byte", "RETRO / baseline",
       "share of bytes with r(C)<=0.125", "RETRO on that share", "baseline on that share"],
      [[f"{r['fraction']:.0%} ({r['documents']} files)", r["chunks"], r["bpb"],
        r["bpb"] / r["baseline_bpb"], r["alpha_fraction_of_bytes"], r["bpb_alpha_0125"],
        r["baseline_bpb_alpha_0125"]] for r in rows])
  table += f"\nbaseline (no retrieval): {rows[0]['baseline_bpb']:.4f} bits/byte"
  _plot([r["chunks"] for r in rows], {f"RETRO, k={_K.value}": [r["bpb"] for r in rows]},
        os.path.join(_OUT.value, name + ".png"), "database chunks", logx=True,
        hline=("baseline", rows[0]["baseline_bpb"]))
  _write(name, {"workdir": work, "k": _K.value, "rows": rows}, table)


def _train_config_of(run_dir: str) -> dict:
  """The training config a run's latest checkpoint was written with."""
  ckpts = os.path.join(run_dir, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
  if not steps:
    raise pipeline.PipelineError(f"{ckpts} holds no finished checkpoint")
  with open(os.path.join(ckpts, str(steps[-1]), "config", "metadata")) as f:
    return json.load(f)["train"]


def retrofit(work: str, name: str) -> None:
  runs = _runs(work)
  data = _data(work)
  scratch_cfg = _train_config_of(runs["RETRO"])
  seq_len, batch = scratch_cfg["seq_len"], scratch_cfg["batch_size"]
  preset, vocab = scratch_cfg["model"]["preset"], scratch_cfg["model"]["vocab_size"]
  steps = _RETROFIT_STEPS.value
  run_dir = os.path.join(work, "runs", f"retrofit{steps}")
  cfg = pipeline.train_config(
      data, preset=preset, retrieval=True, steps=steps, seq_len=seq_len, batch_size=batch,
      learning_rate=_LR.value, warmup_steps=max(1, steps // 10),
      eval_every=max(1, steps // 3), eval_batches=4, vocab_size=vocab,
      overrides={"retrofit.checkpoint": runs["baseline"]})
  t0 = time.time()
  pipeline.train(cfg, run_dir)
  train_s = time.time() - t0
  fitted = _evaluate(work, data, [2], os.path.join(work, f"eval_{name}.json"),
                     retro_run=run_dir)
  scratch = _evaluate(work, data, [2], os.path.join(work, f"eval_{name}_scratch.json"))
  base_bpb, base_alpha = _baseline_bpb(scratch)
  pick = lambda rep, k: [_row(r) for r in rep["runs"] if r["k"] == k][0]  # pylint: disable=unnecessary-lambda-assignment
  scratch_steps = max(r["step"] for r in pipeline.read_metrics(runs["RETRO"], "eval"))
  rows = [["baseline (frozen for RETRO-fitting)", scratch_steps, base_bpb, 1.0, base_alpha],
          [f"RETRO-fitted, k=2 (+{steps} steps, encoder+CCA only)", f"{scratch_steps}+{steps}",
           pick(fitted, 2)["bpb"], pick(fitted, 2)["bpb"] / base_bpb,
           pick(fitted, 2)["bpb_alpha_0125"]],
          ["RETRO-fitted, retrieval off", f"{scratch_steps}+{steps}", pick(fitted, "off")["bpb"],
           pick(fitted, "off")["bpb"] / base_bpb, pick(fitted, "off")["bpb_alpha_0125"]],
          ["RETRO from scratch, k=2", scratch_steps, pick(scratch, 2)["bpb"],
           pick(scratch, 2)["bpb"] / base_bpb, pick(scratch, 2)["bpb_alpha_0125"]]]
  table = pipeline.format_table(["model", "steps", "bits/byte", "/ baseline",
                                 "bits/byte, r(C)<=0.125"], rows)
  pipeline.plot_curves({"RETRO from scratch": runs["RETRO"], "baseline": runs["baseline"],
                        "RETRO-fitted": run_dir}, os.path.join(_OUT.value, name + ".png"))
  _write(name, {"workdir": work, "retrofit_steps": steps, "train_seconds": round(train_s, 1),
                "rows": rows}, table)


# The corpora of the gain-vs-overlap experiment, in the order of their cross-document reuse as
# measured (experiments/README.md): quickstart flags that build each one's work directory.
CORPORA = {
    "docs": ("Python 3.11 documentation, reST prose, split by file",
             "--corpus_root=/usr/share/doc/python3.11/html/_sources --suffixes=.txt"),
    "stdlib": ("Python standard library, split by file", "--corpus=stdlib"),
    "scipy": ("SciPy's sources, split by file", "--corpus_root=<site-packages>/scipy"),
    "transformers": ("transformers modeling_*.py, split by model directory (the quickstart)",
                     ""),
    "twins": ("near-duplicate control: transformers with a copy of every held-out model in "
              "the database", "--twin_heldout"),
}


class ExperimentError(Exception):
  """Bad input to an experiment: the message says what and how to fix it."""


def _report(work: str) -> dict:
  path = os.path.join(work, "evaluation.json")
  if not os.path.exists(path):
    raise ExperimentError(f"{work} has no evaluation.json (an unfinished quickstart): rerun "
                          f"`python -m retro_jax.quickstart --workdir={work}` to finish it")
  return manifest_lib.read_json(path)


def _pick(report: dict, k) -> dict:
  rows = [r for r in report["runs"] if str(r["k"]) == str(k)]
  if not rows:
    raise ExperimentError(f"the evaluation of {report['checkpoint']['workdir']} has no run "
                          f"with k={k} (it has {[r['k'] for r in report['runs']]})")
  return rows[0]


def parse_corpora(items) -> dict[str, str]:
  """NAME=WORKDIR pairs; NAME must be one of CORPORA."""
  out = {}
  for item in items or ():
    name, sep, work = item.partition("=")
    if not sep or not work:
      raise ExperimentError(f"--corpora item {item!r} is not NAME=WORKDIR (e.g. "
                            "docs=runs/docs)")
    if name not in CORPORA:
      raise ExperimentError(f"--corpora: unknown corpus {name!r}; known: "
                            f"{', '.join(CORPORA)}")
    if not os.path.isdir(work):
      raise ExperimentError(f"--corpora: work directory {work} of {name} does not exist: "
                            f"build it with `python -m retro_jax.quickstart --workdir={work} "
                            f"{CORPORA[name][1]}`")
    out[name] = os.path.abspath(work)
  if not out:
    raise ExperimentError("--experiment=overlap needs --corpora=NAME=WORKDIR,... (NAME in "
                          f"{', '.join(CORPORA)})")
  return out


def overlap(corpora: dict[str, str], name: str) -> None:
  """Relative gain against measured overlap, one finished quickstart per corpus (paper §4.4,
  Fig. 6): overall, and per r(C) bucket."""
  rows, payload = [], {}
  for corpus, work in corpora.items():
    report = _report(work)
    retro, off, base = _pick(report, _K.value), _pick(report, "off"), _pick(report, "-")
    buckets = list(base["bpb_buckets"])
    high = base["bpb_buckets"][buckets[-1]]["fraction_of_bytes"]
    entry = dict(workdir=work, description=CORPORA[corpus][0], mean_r=report["leakage"]["mean_r"],
                 share_high_overlap=high, bytes=report["data"]["bytes"],
                 baseline=base["bpb"], retro=retro["bpb"], off=off["bpb"],
                 ratio=retro["bpb"] / base["bpb"], off_ratio=off["bpb"] / base["bpb"],
                 buckets={b: dict(share=base["bpb_buckets"][b]["fraction_of_bytes"],
                                  baseline=base["bpb_buckets"][b]["bpb"],
                                  retro=retro["bpb_buckets"][b]["bpb"]) for b in buckets})
    payload[corpus] = entry
    rows.append([corpus, entry["mean_r"], f"{high:.1%}", entry["baseline"], entry["retro"],
                 entry["ratio"], entry["off_ratio"]] +
                [f"{v['retro'] / v['baseline']:.3f} ({v['share']:.0%})"
                 for v in entry["buckets"].values()])
  order = sorted(payload, key=lambda c: payload[c]["mean_r"])
  rows.sort(key=lambda r: payload[r[0]]["mean_r"])
  table = pipeline.format_table(
      ["corpus", "mean r(C)", f"bytes with r(C) in {buckets[-1]}", "baseline bpb",
       f"RETRO k={_K.value} bpb", "RETRO / baseline", "retrieval off / baseline"] +
      [f"RETRO / baseline, r(C) {b} (share)" for b in buckets], rows)
  plt = pipeline.pyplot()
  if plt is not None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [payload[c]["mean_r"] for c in order]
    ax1.plot(xs, [1 - payload[c]["ratio"] for c in order], marker="o", label="RETRO")
    ax1.plot(xs, [1 - payload[c]["off_ratio"] for c in order], marker="x", ls="--",
             label="RETRO, retrieval off")
    for c, x in zip(order, xs):
      ax1.annotate(c, (x, 1 - payload[c]["ratio"]), textcoords="offset points", xytext=(4, 4))
    ax1.axhline(0, color="gray", lw=0.8)
    ax1.set_xlabel("mean r(C) of the held-out chunks (overlap with the database)")
    ax1.set_ylabel("bits/byte gain over the baseline (1 - ratio)")
    ax1.legend()
    ax1.grid(alpha=0.3)
    for c in order:
      ax2.plot(range(len(buckets)), [v["retro"] / v["baseline"] for v in
                                     payload[c]["buckets"].values()], marker="o", label=c)
    ax2.set_xticks(range(len(buckets)))
    ax2.set_xticklabels(buckets)
    ax2.axhline(1, color="gray", lw=0.8)
    ax2.set_xlabel("r(C) bucket of the held-out chunk")
    ax2.set_ylabel("RETRO / baseline bits/byte")
    ax2.legend()
    ax2.grid(alpha=0.3)
    pipeline.save_figure(fig, os.path.join(_OUT.value, name + ".png"))
  _write(name, {"k": _K.value, "corpora": payload}, table)


# Baselines of about 2x and 4x the quickstart RETRO's non-embedding parameters (RETRO counted
# with its encoder, CCA and copy head): RetroConfig fields changed from the preset.
BASELINE_SIZES = {"2x": dict(emb_dim=384, mlp_dim=1536, num_heads=6),
                  "4x": dict(num_layers=12, emb_dim=384, mlp_dim=1536, num_heads=6)}


def _params(cfg) -> tuple[int, int]:
  from retro_jax.model import params as params_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.training import train_config as tc  # pylint: disable=g-import-not-at-top
  model = tc.model_config(cfg)
  return params_lib.count_params(model), params_lib.count_params(model, embeddings=True)


def _scratch_settings(runs) -> dict:
  scratch = _train_config_of(runs["RETRO"])
  return dict(preset=scratch["model"]["preset"], vocab_size=scratch["model"]["vocab_size"],
              steps=scratch["num_steps"], seq_len=scratch["seq_len"],
              batch_size=scratch["batch_size"],
              learning_rate=scratch["optimizer"]["learning_rate"],
              warmup_steps=scratch["optimizer"]["warmup_steps"], seed=scratch["seed"])


def baselines(work: str, name: str) -> None:
  """RETRO against baselines of ~2x and ~4x its parameters at equal training tokens (the
  paper's headline: RETRO 7.5B on par with much larger models)."""
  unknown = [s for s in _SIZES.value if s not in BASELINE_SIZES]
  if unknown:
    raise ExperimentError(f"--sizes: unknown {unknown}; known: {', '.join(BASELINE_SIZES)}")
  runs, data = _runs(work), _data(work)
  st = _scratch_settings(runs)
  common = dict(preset=st["preset"], steps=st["steps"], seq_len=st["seq_len"],
                batch_size=st["batch_size"], learning_rate=st["learning_rate"],
                warmup_steps=st["warmup_steps"], eval_every=max(1, st["steps"] // 6),
                eval_batches=4, vocab_size=st["vocab_size"], seed=st["seed"])
  retro_cfg = pipeline.train_config(data, retrieval=True, **common)
  rows, payload = [], []
  entries = [("RETRO", runs["RETRO"], retro_cfg, "k=" + str(_K.value)),
             ("baseline (same size)", runs["baseline"],
              pipeline.train_config(data, retrieval=False, **common), "-")]
  for size in _SIZES.value:
    cfg = pipeline.train_config(data, retrieval=False, overrides={
        f"model.{k}": v for k, v in BASELINE_SIZES[size].items()}, **common)
    run_dir = os.path.join(work, "runs", f"baseline_{size}")
    t0 = time.time()
    pipeline.train(cfg, run_dir)
    logging.info("baseline %s trained in %.0f s", size, time.time() - t0)
    entries.append((f"baseline {size}", run_dir, cfg, "-"))
  retro_params = _params(retro_cfg)[0]
  for label, run_dir, cfg, k in entries:
    if label == "RETRO":
      report = _evaluate(work, data, [_K.value], os.path.join(work, f"eval_{name}.json"))
      row = _pick(report, _K.value)
    else:
      out = os.path.join(work, f"eval_{name}_{os.path.basename(run_dir)}.json")
      report = _evaluate(work, data, [_K.value], out, baseline_run=run_dir)
      row = _pick(report, "-")
    n, n_emb = _params(cfg)
    payload.append(dict(model=label, run=run_dir, params=n, params_with_embeddings=n_emb,
                        bpb=row["bpb"], bpb_buckets={b: v["bpb"] for b, v in
                                                     row["bpb_buckets"].items()}))
    rows.append([label, f"{n / 1e6:.2f}M", f"{n / retro_params:.2f}x", f"{n_emb / 1e6:.2f}M",
                 k, row["bpb"]] + [v["bpb"] for v in row["bpb_buckets"].values()])
  base = payload[1]["bpb"]
  for r, p in zip(rows, payload):
    r.insert(6, p["bpb"] / base)
  buckets = list(payload[0]["bpb_buckets"])
  table = pipeline.format_table(
      ["model", "params (non-embedding)", "/ RETRO", "params (all)", "k", "bits/byte",
       "/ same-size baseline"] + [f"r(C) {b}" for b in buckets], rows)
  table += (f"\nall trained {st['steps']} steps of {st['batch_size']} x {st['seq_len']} tokens "
            f"(equal training tokens), lr {st['learning_rate']}, seed {st['seed']}")
  # The trainers' periodic held-out estimates: whether size helps at every step, not only
  # at the last (a larger baseline that is behind throughout has not used its size).
  by_step = {p["model"]: {r["step"]: r["bits_per_byte"] for r in
                          pipeline.read_metrics(p["run"], "eval")} for p in payload}
  steps = sorted(set.intersection(*(set(v) for v in by_step.values())))
  tokens_per_step = st["batch_size"] * st["seq_len"]
  table += "\n\nperiodic held-out estimate (first 4 held-out batches) by training step:\n"
  table += pipeline.format_table(
      ["step", "training tokens"] + [f"{p['model']} bpb" for p in payload],
      [[s, s * tokens_per_step] + [by_step[p["model"]][s] for p in payload] for s in steps])
  pipeline.plot_curves({p["model"]: p["run"] for p in payload},
                       os.path.join(_OUT.value, name + "_curves.png"))
  plt = pipeline.pyplot()
  if plt is not None:
    fig, ax = plt.subplots(figsize=(6, 4))
    bl = [p for p in payload if p["model"] != "RETRO"]
    ax.plot([p["params"] for p in bl], [p["bpb"] for p in bl], marker="o", label="baselines")
    ax.plot([payload[0]["params"]], [payload[0]["bpb"]], marker="*", ms=14, ls="",
            label=f"RETRO, k={_K.value}")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("held-out bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    pipeline.save_figure(fig, os.path.join(_OUT.value, name + ".png"))
  _write(name, {"workdir": work, "k": _K.value, "steps": st["steps"], "rows": payload,
               "tokens_per_step": tokens_per_step, "curves": by_step}, table)


def curves(work: str, name: str) -> None:
  """Held-out bits/byte against training tokens for RETRO and its baseline over
  --curve_steps steps (resumable: rerun to continue; --report_only tabulates a partial run)."""
  larger = [f"baseline_{size}" for size in BASELINE_SIZES]
  known = ["RETRO", "baseline"] + larger
  unknown = [m for m in _CURVE_MODELS.value if m not in known]
  if unknown:
    raise ExperimentError(f"--curve_models: unknown {unknown}; known: {', '.join(known)}")
  runs, data = _runs(work), _data(work)
  st = _scratch_settings(runs)
  steps = _CURVE_STEPS.value
  tokens_per_step = st["batch_size"] * st["seq_len"]
  curve_runs = {"RETRO": os.path.join(work, "runs", f"curve{steps}_retro"),
                "baseline": os.path.join(work, "runs", f"curve{steps}_baseline")}
  # Larger baselines on the same schedule (the paper's "RETRO matches a bigger model"),
  # reported where their runs exist.
  for label in larger:
    path = os.path.join(work, "runs", f"curve{steps}_{label}")
    if label in _CURVE_MODELS.value or os.path.isdir(path):
      curve_runs[label] = path
  if not _REPORT_ONLY.value:
    for label in _CURVE_MODELS.value:
      size = label[len("baseline_"):] if label in larger else None
      cfg = pipeline.train_config(
          data, preset=st["preset"], retrieval=label == "RETRO", steps=steps,
          seq_len=st["seq_len"], batch_size=st["batch_size"],
          learning_rate=st["learning_rate"], warmup_steps=max(1, steps // 20),
          eval_every=_CURVE_EVERY.value, eval_batches=_CURVE_BATCHES.value,
          vocab_size=st["vocab_size"], seed=st["seed"],
          overrides={"keep_checkpoints": 2,
                     **{f"model.{k}": v for k, v in BASELINE_SIZES.get(size, {}).items()}})
      pipeline.train(cfg, curve_runs[label])
  by_step = {label: {r["step"]: r["bits_per_byte"] for r in pipeline.read_metrics(path, "eval")}
             for label, path in curve_runs.items()}
  common = sorted(set(by_step["RETRO"]) & set(by_step["baseline"]))
  if not common:
    raise ExperimentError(f"the curve runs {curve_runs['RETRO']} and {curve_runs['baseline']} "
                          "have no common evaluated step yet: run without --report_only")
  extra = [label for label in curve_runs if label in larger]
  rows = [[s, s * tokens_per_step, by_step["RETRO"][s], by_step["baseline"][s],
           by_step["RETRO"][s] / by_step["baseline"][s]] +
          [by_step[label].get(s, "") for label in extra] for s in common]
  finished = common[-1] >= steps
  if not finished and not _REPORT_ONLY.value and len(_CURVE_MODELS.value) < 2:
    return  # the other model's process writes the report when both are done
  table = pipeline.format_table(
      ["step", "training tokens", "RETRO bpb", "baseline bpb", "RETRO / baseline"] +
      [f"{label} bpb" for label in extra], rows)
  table += (f"\nperiodic held-out estimate on the first {_CURVE_BATCHES.value} held-out "
            f"batches (approximate bytes per token); {'finished' if finished else 'PARTIAL'}: "
            f"{common[-1]} of {steps} steps")
  final = None
  if finished:
    final = _evaluate(work, data, [_K.value], os.path.join(work, f"eval_{name}.json"),
                      retro_run=curve_runs["RETRO"], baseline_run=curve_runs["baseline"])
    table += "\n\nfull held-out evaluation at the last step:\n" + pipeline.comparison_table(
        final)[0]
  plt = pipeline.pyplot()
  if plt is not None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in curve_runs:
      have = [r for r in rows if r[0] in by_step[label]]
      ax.plot([r[1] for r in have], [by_step[label][r[0]] for r in have], marker=".",
              label=label)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out bits per byte (periodic estimate)")
    ax.grid(alpha=0.3)
    ax.legend()
    pipeline.save_figure(fig, os.path.join(_OUT.value, name + ".png"))
  _write(name, {"workdir": work, "steps": steps, "reached": common[-1], "finished": finished,
                "tokens_per_step": tokens_per_step, "curves": by_step,
                "final": final and pipeline.comparison_table(final)[1]}, table)


def _fail(msg: str) -> None:
  sys.exit(f"run_experiments: {msg}")


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}")
  name = _NAME.value or _EXPERIMENT.value
  try:
    if _EXPERIMENT.value == "overlap":
      corpora = parse_corpora(_CORPORA.value)
      os.makedirs(_OUT.value, exist_ok=True)
      return overlap(corpora, name)
    if not _WORKDIR.value:
      raise ExperimentError(f"--experiment={_EXPERIMENT.value} needs --workdir (a finished "
                            "quickstart work directory)")
    work = os.path.abspath(_WORKDIR.value)
    if not os.path.isdir(work):
      raise ExperimentError(f"--workdir {work} does not exist: run `python -m "
                            f"retro_jax.quickstart --workdir={work}` first")
    missing = [f for f in ("evaluation.json", "tokenizer", "db", "eval_chunks")
               if not os.path.exists(os.path.join(work, f))]
    if missing:
      raise ExperimentError(f"{work} is not a finished quickstart work directory (no "
                            f"{', '.join(missing)}): rerun `python -m retro_jax.quickstart "
                            f"--workdir={work}` to finish it")
    os.makedirs(_OUT.value, exist_ok=True)
    {"gain": gain, "neighbors_k": neighbors_k, "db_size": db_size, "retrofit": retrofit,
     "baselines": baselines, "curves": curves}[_EXPERIMENT.value](work, name)
  except (ExperimentError, pipeline.PipelineError, FileNotFoundError) as e:
    _fail(str(e))


if __name__ == "__main__":
  app.run(main)
