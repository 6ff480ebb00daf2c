"""The real path, small: MiniLM embeddings -> ScaNN -> precompute_neighbors -> loader -> one
train step -> evaluation with live retrieval.

Every other database test uses the model-free `hashing:N` embedder and every training test
reads hand-written neighbor files; this one runs the components a user runs, on ~6 KB of
text (so it stays well under a minute): the offline all-MiniLM-L6-v2 checkpoint embeds the
chunks, ScaNN indexes them, the precompute job writes the neighbors, the trainer's loader
reads them into a batch and takes one step, and the evaluation job scores held-out
documents retrieving with the same index.  Along the way it checks what each stage hands to
the next: the neighbors are the exact nearest (other-document) chunks by the stored MiniLM
embeddings, and the batch holds exactly those neighbors' tokens.
"""

import math
import os

import numpy as np
import pytest

import fixtures_data as fx
from retro_jax import fileio as manifest_lib
from retro_jax.evaluation import evaluate as eval_lib
from retro_jax.retrieval.db import database as database_lib
from retro_jax.retrieval.jobs import build as build_lib
from retro_jax.retrieval.jobs import precompute as pn_lib
from retro_jax.training import trainer
from test_build_db import make_tokenizer  # pylint: disable=g-bad-import-order
from test_build_db import write_corpus  # pylint: disable=g-bad-import-order

fx.enable_compilation_cache()
M = 8


@pytest.fixture(scope="module")
def real_db(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("e2e"))
  corpus = write_corpus(os.path.join(root, "corpus"), num_docs=10, words_per_doc=(60, 120))
  tok = make_tokenizer(os.path.join(root, "tok"))
  db_dir = os.path.join(root, "db")
  build_lib.build_database(corpus, tok, db_dir, chunk_size=M)  # bert=None: offline MiniLM
  nb_dir = os.path.join(root, "neighbors")
  pn_lib.precompute_neighbors(db_dir, nb_dir, k=2)
  return dict(root=root, corpus=corpus, tok=tok, db_dir=db_dir, nb_dir=nb_dir)


def test_real_path_from_minilm_to_evaluation(real_db):
  db_dir, nb_dir = real_db["db_dir"], real_db["nb_dir"]
  size = sum(os.path.getsize(os.path.join(real_db["corpus"], f))
             for f in os.listdir(real_db["corpus"]))
  assert size < 10_000
  man = manifest_lib.read_manifest(db_dir)
  assert "minilm" in str(man["embedder"]).lower(), man["embedder"]
  assert man["index"]["recall"], man["index"]

  # The precomputed neighbors are the exact nearest chunks of other documents by the
  # stored (unit-norm, dot-product) MiniLM embeddings.
  db = database_lib.Database.open(db_dir)
  emb = np.asarray(db.embeddings, np.float32)
  docs = np.asarray(db.store.doc_ids)
  ids = np.load(os.path.join(nb_dir, "neighbors.npy"))
  assert ids.shape == (db.store.num_chunks, 2)
  sim = emb @ emb.T
  sim[docs[:, None] == docs[None, :]] = -np.inf
  top = np.argsort(-sim, axis=1, kind="stable")[:, :2]
  near = np.take_along_axis(sim, ids, axis=1)
  np.testing.assert_allclose(near, np.take_along_axis(sim, top, axis=1), atol=1e-4)
  assert (docs[ids] != docs[:, None]).all()

  # The loader reads them; one train step on them.
  cfg = fx.tiny_config({"db_dir": db_dir, "neighbors_dir": nb_dir}, num_steps=1,
                       checkpoint_every=1, **{"model.vocab_size": 30522})
  model_cfg = trainer.train_config.model_config(cfg)
  data = trainer.open_data(cfg, model_cfg)
  batch = next(data.train)
  real = batch["neighbor_ids"] >= 0
  assert real.mean() > 0.5
  nid = batch["neighbor_ids"][real]
  np.testing.assert_array_equal(batch["neighbors"][real], db.store.neighbor_tokens(nid))
  rows = np.broadcast_to(batch["chunk_ids"][..., None], real.shape)[real]
  assert set(nid.tolist()) <= set(ids[rows].reshape(-1).tolist())
  workdir = os.path.join(real_db["root"], "run")
  out = trainer.train_and_evaluate(cfg, workdir)
  assert out["step"] == 1 and math.isfinite(out["losses"][1])

  # Evaluation of held-out text, retrieving live from the same index with MiniLM.
  held_out = write_corpus(os.path.join(real_db["root"], "held_out"), num_docs=2,
                          words_per_doc=(60, 90), seed=5)
  settings = eval_lib.EvalSettings(seq_len=4 * M, stride=2 * M, ks=(2,), batch_size=4,
                                   progress=False)
  report = eval_lib.run_evaluation(workdir, corpus=held_out, db_dir=db_dir,
                                   settings=settings)
  runs = {str(r["k"]): r for r in report["runs"]}
  assert set(runs) == {"off", "2"}
  for r in runs.values():
    assert math.isfinite(r["bpb"]) and r["tokens"] == report["data"]["tokens"] > 0
  assert runs["2"]["bpb"] != runs["off"]["bpb"]
  assert len(report["leakage"]["r"]) == report["data"]["chunks"]
