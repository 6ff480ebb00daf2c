"""The pipeline copy check: through every real stage, RETRO copies what its database holds.

SentencePiece tokenizer -> chunk store -> embeddings (the lexical hashing embedder) -> ScaNN
index -> precompute_neighbors -> loader -> trainer -> evaluator, on real text (stdlib
sources) whose held-out documents each have an exact twin in the database.  A RETRO that
reads its neighbors must predict those documents far better than its baseline trained the
same way; one whose retrieval is broken anywhere (wrong chunk ids, neighbors of the wrong
chunk, continuations cut, CCA windows off by a chunk) cannot.  The experiment version is
`python -m retro_jax.quickstart --twin_heldout` (experiments/README.md).
"""

import glob
import os
import sysconfig

from retro_jax import pipeline


def _corpus(root, num_docs=24, max_bytes=2000):
  os.makedirs(root)
  paths = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
  for path in paths[:num_docs]:
    text = open(path, encoding="utf-8", errors="replace").read()[:max_bytes]
    with open(os.path.join(root, os.path.basename(path)), "w", encoding="utf-8") as f:
      f.write(text)


def test_retro_copies_held_out_documents_whose_twins_are_in_the_database(tmp_path):
  root = str(tmp_path / "corpus")
  _corpus(root)
  summary = pipeline.run_quickstart(
      workdir=str(tmp_path / "work"), scale=1.0, corpus_root=root, steps=60,
      train_bytes=200_000, eval_bytes=200_000, preset="tiny", vocab_size=400, seq_len=32,
      batch_size=8, learning_rate=3e-3, eval_k=[1, 2], bert="hashing:256", twin_eval=True,
      model_overrides=dict(align_neighbors=True, neighbor_min_match=4, copy_head=True),
      eval_percent=30)
  res = summary["results"]
  retro, off, base = res["RETRO, k=2"]["bpb"], res["RETRO, retrieval off"]["bpb"], \
      res["baseline"]["bpb"]
  assert retro < 0.7 * base, (retro, base)
  # The gain is the neighbors': without them the same model is no better than the baseline.
  assert off > 0.9 * base, (off, base)
  assert "RETRO, k=2" in summary["table"] and "r(C) 0.5-1" in summary["table"]
  assert summary["corpus"].startswith(f"corpus: directory {os.path.abspath(root)};")
