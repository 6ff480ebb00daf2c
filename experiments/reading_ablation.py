r"""Which options make RETRO read its neighbors: an ablation on a quickstart work directory.

    python -m retro_jax.quickstart --workdir=runs/qs          # builds the data, RETRO, baseline
    python experiments/reading_ablation.py --workdir=runs/qs [--variants=paper,copy,...]

Every variant trains the quickstart's RETRO (same data, steps, seed, learning rate as the
quickstart's run in WORKDIR) with a different set of the reading options of
retro_jax.config (the rest off; "recipe" is the quickstart's own run, not retrained), then
is evaluated on the held-out split against the quickstart's baseline
(same evaluation as the quickstart: bits/byte overall and per r(C) bucket).  Runs resume
(`WORKDIR/ablation/<variant>`); finished ones are only re-evaluated when their report is
missing.  Writes results/reading_ablation{--tag}.{json,md}.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from retro_jax import fileio as manifest_lib  # pylint: disable=wrong-import-position
from retro_jax import pipeline  # pylint: disable=wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
OFF = dict(align_neighbors=False, neighbor_min_match=0, copy_head=False, cca_rank_bias=False,
           cca_gate=False)
RECIPE = dict(align_neighbors=True, neighbor_min_match=8, copy_head=True, cca_gate=True)
VARIANTS = {
    "paper": {},
    "rank_bias": dict(cca_rank_bias=True),
    "copy": dict(copy_head=True),
    "gate": dict(cca_gate=True),
    "align+filter": dict(align_neighbors=True, neighbor_min_match=8),
    "recipe - copy": {**RECIPE, "copy_head": False},
    "recipe - gate": {**RECIPE, "cca_gate": False},
    "recipe - align": {**RECIPE, "align_neighbors": False},
    "recipe - filter": {**RECIPE, "neighbor_min_match": 0},
    "recipe + rank_bias": {**RECIPE, "cca_rank_bias": True},
    # The quickstart's own RETRO run (the `quickstart` preset), not retrained.
    "recipe": RECIPE,
}
_WORKDIR = flags.DEFINE_string("workdir", None, "A finished quickstart work directory.")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), f"Any of {list(VARIANTS)}.")
_TAG = flags.DEFINE_string("tag", "", "Suffix of the result files.")
_OUT = flags.DEFINE_string("results_dir", os.path.join(HERE, "results"), "Output directory.")


def quickstart_run_config(workdir: str) -> dict:
  """The training config the quickstart's RETRO run recorded in its last checkpoint."""
  from retro_jax.inference import checkpoints as ckpt_lib  # pylint: disable=g-import-not-at-top
  try:
    return ckpt_lib.load_model(os.path.join(workdir, "runs", "retro")).train_config
  except ckpt_lib.CheckpointError as e:
    raise app.UsageError(f"{e}: run the quickstart with --workdir={workdir} first") from None


def main(argv):
  del argv
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  bad = sorted(set(_VARIANTS.value) - set(VARIANTS))
  if bad:
    raise app.UsageError(f"--variants: unknown {bad}; known: {list(VARIANTS)}")
  work = _WORKDIR.value
  qs = quickstart_run_config(work)
  data = pipeline.Data(db_dir=qs["data"]["db_dir"], tokenizer="",
                       eval_chunks=qs["data"]["eval_chunks_dir"],
                       train_neighbors=qs["data"]["neighbors_dir"],
                       eval_neighbors=qs["data"]["eval_neighbors_dir"])
  baseline = os.path.join(work, "runs", "baseline")
  rows, results = [], {}
  for name in _VARIANTS.value:
    run_dir = os.path.join(work, "ablation", name.replace(" ", ""))
    if name == "recipe":
      run_dir = os.path.join(work, "runs", "retro")
    overrides = {f"model.{k}": v for k, v in {**OFF, **VARIANTS[name]}.items()}
    cfg = pipeline.train_config(
        data, preset=qs["model"]["preset"], retrieval=True, steps=qs["num_steps"],
        seq_len=qs["seq_len"], batch_size=qs["batch_size"],
        learning_rate=qs["optimizer"]["learning_rate"],
        warmup_steps=qs["optimizer"]["warmup_steps"], eval_every=qs["eval_every"],
        eval_batches=qs["eval_batches"], vocab_size=qs["model"]["vocab_size"], seed=qs["seed"],
        overrides=overrides)
    t0 = time.time()
    report_path = os.path.join(run_dir, "evaluation.json")
    if name == "recipe":  # the quickstart's run and its report
      report_path = os.path.join(work, "evaluation.json")
    else:
      pipeline.train(cfg, run_dir)
    train_s = time.time() - t0
    if os.path.exists(report_path):
      report = manifest_lib.read_json(report_path)
    else:
      report = pipeline.evaluate_pair(data, run_dir, baseline, ks=[2], output=report_path,
                                      progress=False)
    _, res = pipeline.comparison_table(report)
    base = res["baseline"]["bpb"]
    results[name] = dict(options=VARIANTS[name], train_seconds=train_s, **res)
    k2, off = res["RETRO, k=2"], res["RETRO, retrieval off"]
    low = list(k2["bpb_buckets"])[0]
    rows.append([name, k2["bpb"], k2["bpb"] / base, off["bpb"] / base,
                 k2["bpb_buckets"][low], res["baseline"]["bpb_buckets"][low]])
    print(pipeline.format_table(["variant", "RETRO k=2 bpb", "/ baseline", "off / baseline",
                                 f"k=2, r(C) {low}", f"baseline, r(C) {low}"], rows[-1:]),
          flush=True)
  table = pipeline.format_table(["variant", "RETRO k=2 bpb", "/ baseline", "off / baseline",
                                 "k=2 bpb, r(C) low bucket", "baseline, r(C) low bucket"], rows)
  head = (f"quickstart work directory {work}: preset {qs['model']['preset']}, "
          f"{qs['num_steps']} steps, batch {qs['batch_size']} x {qs['seq_len']}, lr "
          f"{qs['optimizer']['learning_rate']}, seed {qs['seed']}; baseline "
          f"{results[next(iter(results))]['baseline']['bpb']:.4f} bits/byte")
  os.makedirs(_OUT.value, exist_ok=True)
  stem = os.path.join(_OUT.value, f"reading_ablation{_TAG.value}")
  manifest_lib.atomic_write_json(stem + ".json", {"workdir": work, "runs": results})
  manifest_lib.atomic_write_bytes(stem + ".md", (head + "\n\n" + table + "\n").encode())
  print(head)
  print(table)


if __name__ == "__main__":
  app.run(main)
