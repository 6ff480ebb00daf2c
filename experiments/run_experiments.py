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
(`build_db.subset_database`, same embeddings, nested subsets; paper Table 4 / Fig. 1);
`retrofit` freezes the trained baseline, adds an encoder and CCA and trains only those for
`--retrofit_steps` (paper §4.2), then evaluates it next to RETRO trained from scratch.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

from absl import app
from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from retro_jax import pipeline  # pylint: disable=wrong-import-position
from retro_jax.retrieval import manifest as manifest_lib  # pylint: disable=wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished quickstart work directory.",
                               required=True)
_EXPERIMENT = flags.DEFINE_enum("experiment", None, ["gain", "neighbors_k", "db_size",
                                                     "retrofit"], "Which experiment.",
                                required=True)
_NAME = flags.DEFINE_string("name", None, "Result file stem (default: the experiment name).")
_KS = flags.DEFINE_list("ks", ["1", "2", "5", "10"], "neighbors_k: neighbor counts.")
_FRACTIONS = flags.DEFINE_list("fractions", ["0.01", "0.1", "1"],
                               "db_size: fractions of the training documents.")
_K = flags.DEFINE_integer("k", 2, "db_size: neighbors at evaluation.")
_RETROFIT_STEPS = flags.DEFINE_integer("retrofit_steps", 150, "retrofit: training steps.")
_LR = flags.DEFINE_float("learning_rate", 2e-3, "retrofit: peak learning rate.")
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


def _evaluate(work: str, data: pipeline.Data, ks, output: str, with_baseline=True,
              retro_run: str | None = None) -> dict:
  runs = _runs(work)
  if os.path.exists(output):
    return json.load(open(output))
  return pipeline.evaluate_pair(data, retro_run or runs["RETRO"],
                                runs["baseline"] if with_baseline else None, ks=ks,
                                output=output, progress=False)


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
  table = pipeline.format_table(
      ["RETRO evaluated with", "bits/byte", "RETRO / baseline", "bits/byte, r(C)<=0.125"],
      [[("k=" + str(r["k"])) if r["k"] not in ("-", "off") else (
          "baseline" if r["k"] == "-" else "retrieval off"), r["bpb"], r["bpb"] / base_bpb,
        r["bpb_alpha_0125"] if r["bpb_alpha_0125"] is not None else "-"] for r in rows])
  retro = {int(r["k"]): r["bpb"] for r in rows if r["k"] not in ("-", "off")}
  _plot(sorted(retro), {"RETRO": [retro[k] for k in sorted(retro)]},
        os.path.join(_OUT.value, name + ".png"), "neighbors k at evaluation",
        hline=("baseline", base_bpb))
  _write(name, {"workdir": work, "rows": rows}, table)


def db_size(work: str, name: str) -> None:
  from retro_jax.retrieval import build_db  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval import precompute_neighbors as pn  # pylint: disable=g-import-not-at-top
  rows = []
  for frac in sorted(float(f) for f in _FRACTIONS.value):
    if frac >= 1.0:
      db_dir = os.path.join(work, "db")
    else:
      db_dir = os.path.join(work, "db_subsets", f"{frac:g}")
      if not os.path.exists(os.path.join(db_dir, manifest_lib.MANIFEST)):
        build_db.subset_database(os.path.join(work, "db"), db_dir, frac)
    nb = os.path.join(work, "neighbors", "eval" if frac >= 1.0 else f"eval_db{frac:g}")
    if not os.path.exists(os.path.join(nb, manifest_lib.MANIFEST)):
      pn.precompute_neighbors(db_dir, nb, k=10, query_store=os.path.join(work, "eval_chunks"),
                              exclude_same_document=False)
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  work = os.path.abspath(_WORKDIR.value)
  name = _NAME.value or _EXPERIMENT.value
  os.makedirs(_OUT.value, exist_ok=True)
  missing = [f for f in ("evaluation.json", "tokenizer", "db", "eval_chunks")
             if not os.path.exists(os.path.join(work, f))]
  if missing:
    raise app.UsageError(f"{work} is not a finished quickstart work directory (no "
                         f"{', '.join(missing)}): run `python -m retro_jax.quickstart "
                         f"--workdir={work}` first")
  try:
    {"gain": gain, "neighbors_k": neighbors_k, "db_size": db_size,
     "retrofit": retrofit}[_EXPERIMENT.value](work, name)
  except (pipeline.PipelineError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  app.run(main)
