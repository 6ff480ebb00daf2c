"""Plots and tables of finished runs: held-out curves, the side-by-side evaluation table.

What the quickstart prints and draws, and what experiments/*.py reuse.  matplotlib is a
dependency (the quickstart's curves are part of what it promises); figures are drawn on the
non-interactive Agg backend.
"""

from __future__ import annotations

import io
import json
import os

import matplotlib.pyplot as plt

from retro_jax import fileio
from retro_jax.tables import format_table


def read_metrics(run_dir: str, kind: str = "eval") -> list[dict]:
  """Rows of a run's metrics.jsonl of one kind ("train" or "eval")."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = [json.loads(line) for line in open(path) if line.strip()]
  return [r for r in rows if r.get("kind", r.get("split")) == kind]


def pyplot():
  """matplotlib.pyplot on the Agg backend (files only, no display)."""
  plt.switch_backend("Agg")
  return plt


def save_figure(fig, path: str) -> str:
  """Writes a figure as PNG atomically and closes it."""
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120)
  plt.close(fig)
  fileio.atomic_write_bytes(path, buf.getvalue())
  return path


def plot_curves(runs: dict[str, str], path: str, metric: str = "bits_per_byte") -> str:
  """Held-out `metric` over training steps for each run, as a PNG; returns its path."""
  fig, ax = pyplot().subplots(figsize=(6, 4))
  for label, run_dir in runs.items():
    rows = [r for r in read_metrics(run_dir, "eval") if metric in r]
    if rows:
      ax.plot([r["step"] for r in rows], [r[metric] for r in rows], marker="o", label=label)
  ax.set_xlabel("training step")
  ax.set_ylabel(f"held-out {metric.replace('_', ' ')}")
  ax.grid(alpha=0.3)
  ax.legend()
  return save_figure(fig, path)


QUICKSTART_ALPHA = "0.125"


def comparison_table(report: dict) -> tuple[str, dict]:
  """Side-by-side rows (baseline, RETRO without and with retrieval) from an evaluation report:
  perplexity, bits/byte, and bits/byte in each r(C) bucket (where the gain comes from)."""
  rows, results = [], {}
  first = report["runs"][0] if report["runs"] else {}
  buckets = list(first.get("bpb_buckets", {}))
  for run in report["runs"]:
    k = str(run["k"])
    name = ("baseline" if k == "-" else "RETRO, retrieval off" if k == "off" else
            f"baseline + n-gram copy, k={k[4:]}" if k.startswith("copy") else f"RETRO, k={k}")
    by_bucket = {b: run.get("bpb_buckets", {}).get(b, {}).get("bpb") for b in buckets}
    rows.append([name, run["ppl"], run["bpb"]] +
                [v if v is not None else "-" for v in by_bucket.values()])
    alpha = run.get("bpb_alpha", {}).get(QUICKSTART_ALPHA, {})
    results[name] = dict(ppl=run["ppl"], bpb=run["bpb"], bpb_alpha_0125=alpha.get("bpb"),
                         bpb_buckets=by_bucket)
  table = format_table(["model", "perplexity", "bits/byte"] +
                       [f"r(C) {b}" for b in buckets], rows)
  d = report["data"]
  notes = [f"held-out: {d['documents']} documents, {d['tokens']} tokens, {d['bytes']} bytes"]
  if buckets:
    shares = ", ".join(f"{b}: {first['bpb_buckets'][b]['fraction_of_bytes']:.1%}"
                       for b in buckets)
    notes.append("r(C) = longest token run a chunk shares with its 10 nearest database "
                 f"neighbors / chunk size (paper §2.6); share of the bytes per bucket: {shares}")
  return table + "\n" + "\n".join(notes), results
