"""Evaluation: windowing, hand-computed ppl/bpb, neighbor alignment, end to end, bad input.

Also holds the helpers test_generate.py imports: a tiny real database (the retrieval tests'
`make_db`: MiniLM tokenizer.json + the model-free hashing embedder) and a training workdir
written with the training checkpointer, so `load_model` reads what `train` writes.
"""

import functools
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax import config as config_lib
from retro_jax import fileio as manifest_lib
from retro_jax import options as options_lib
from retro_jax.evaluation import evaluate as eval_lib
from retro_jax.evaluation import scoring
from retro_jax.evaluation import sources
from retro_jax.inference import checkpoints as ckpt_lib
from retro_jax.model import abstract_params
from fixtures_data import enable_compilation_cache  # pylint: disable=g-bad-import-order
from test_build_db import make_db  # pylint: disable=g-bad-import-order
from test_build_db import write_corpus  # pylint: disable=g-bad-import-order

enable_compilation_cache()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M = 8
VOCAB = 30522  # the MiniLM tokenizer of make_db
TINY = config_lib.get_preset("tiny", vocab_size=VOCAB, chunk_size=M)


# --- helpers shared with test_generate.py ---------------------------------------------------

def save_workdir(path: str, cfg, params, db_dir: str, seq_len: int = 2 * M, step: int = 1):
  """A workdir as retro_jax.train leaves it (state/data/config under checkpoints/<step>)."""
  from retro_jax.training import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  ck = checkpoint_lib.Checkpointer(os.path.join(path, "checkpoints"), async_save=False)
  state = {"step": jnp.int32(step), "params": params, "opt_state": {}}
  train = {"seq_len": seq_len, "data": {"db_dir": db_dir, "pad_id": 0}}
  ck.save(step, state, {"epoch": 0, "position": 0}, {"train": train, "model": cfg.to_dict()},
          force=True)
  ck.close()
  return path


def _cli_env() -> dict:
  """The test process's persistent compilation cache, shared with CLI subprocesses."""
  import tempfile  # pylint: disable=g-import-not-at-top
  return dict(os.environ,
              JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(),
                                                     "retro_jax_test_jit_cache"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")


@functools.lru_cache(maxsize=None)
def _params(cfg):
  """Random float32 params of cfg's shapes, drawn with numpy (no init compile: tests only
  need some fixed weights; chunk size does not change the shapes)."""
  rng = np.random.default_rng(0)
  shapes = nn.unbox(abstract_params(cfg.replace(chunk_size=M)))
  return jax.tree.map(lambda a: jnp.asarray(0.05 * rng.standard_normal(a.shape), a.dtype),
                      shapes)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A tiny database, an evaluation corpus (one doc copied from the DB) and two workdirs."""
  root = str(tmp_path_factory.mktemp("evalworld"))
  db_dir = make_db(root, num_docs=8, chunk_size=M, dim=32)
  corpus = write_corpus(os.path.join(root, "eval_corpus"), 3, seed=7)
  db_doc = sorted(os.listdir(os.path.join(root, "db_corpus")))[0]
  with open(os.path.join(root, "db_corpus", db_doc), encoding="utf-8") as f:
    leaked = f.read()
  with open(os.path.join(corpus, "zz_leaked.txt"), "w", encoding="utf-8") as f:
    f.write(leaked)
  retro = save_workdir(os.path.join(root, "retro"), TINY, _params(TINY), db_dir)
  base_cfg = TINY.baseline()
  base = save_workdir(os.path.join(root, "base"), base_cfg, _params(base_cfg), db_dir)
  return dict(root=root, db_dir=db_dir, corpus=corpus, retro=retro, base=base)


def _docs(token_lists, m=4, doc_bytes=None, keys=None):
  """EvalDocs from token lists (each already ending with its eos)."""
  rows, offsets = [], [0]
  for t in token_lists:
    c = -(-len(t) // m)
    a = np.full(c * m, -1, np.int32)
    a[:len(t)] = t
    rows.append(a.reshape(c, m))
    offsets.append(offsets[-1] + c)
  nb = np.asarray(doc_bytes if doc_bytes is not None else [3 * len(t) for t in token_lists])
  return sources.EvalDocs(np.concatenate(rows), np.asarray(offsets, np.int64), nb,
                          keys or [f"d{i}" for i in range(len(token_lists))],
                          {"chunk_size": m})


# --- windowing ------------------------------------------------------------------------------

@pytest.mark.parametrize("n, stride, m", [(8, 4, 2), (8, 8, 4), (16, 8, 4), (12, 4, 4),
                                          (4, 4, 4), (64, 32, 8)])
@pytest.mark.parametrize("length", [1, 2, 3, 5, 8, 9, 16, 17, 33, 100])
def test_windows_score_every_token_exactly_once(n, stride, m, length):
  windows = scoring.plan_windows(length, n, stride, m)
  counts = np.zeros(length, int)
  for j, w in enumerate(windows):
    assert w.start % m == 0 and 0 < w.length <= n
    assert w.start <= w.score_from < w.start + w.length
    if j:  # a later window scores only positions with at least n - s tokens of context
      assert w.score_from - w.start >= n - stride or w.start + w.length == length - 1
      assert w.score_from == windows[j - 1].start + windows[j - 1].length
    counts[w.score_from + 1:w.start + w.length + 1] += 1  # targets of scored positions
  expected = np.ones(length, int)
  expected[0] = 0  # t_0 is scored separately, after [eos]
  np.testing.assert_array_equal(counts, expected)


def test_bad_window_settings_are_refused():
  with pytest.raises(scoring.WindowError, match="multiple of the chunk size"):
    scoring.plan_windows(10, 12, 4, 8)
  with pytest.raises(scoring.WindowError, match="stride"):
    scoring.plan_windows(10, 16, 4, 8)
  assert scoring.default_stride(24, 8) == 8 and scoring.default_stride(2048, 64) == 1024


# --- hand computations ---------------------------------------------------------------------

def _bigram_fn(params, inputs, neighbors):
  del neighbors
  return params[inputs]  # [B, n, V]: logits depend on the previous token only


def test_uniform_model_gives_vocab_perplexity():
  v, eos = 7, 6
  docs = _docs([[1, 2, 3, 4, 5, eos], [2, eos], list(range(6)) * 3 + [eos]],
               doc_bytes=[11, 2, 40])
  c = eval_lib.Contender("uniform", _bigram_fn, jnp.zeros((v, v)), False)
  nll = eval_lib.score_documents(c, docs, eos, eval_lib.EvalSettings(
      seq_len=8, stride=4, batch_size=3, progress=False))
  run = eval_lib.summarize("uniform", "-", nll, docs)
  tokens = 6 + 2 + 19
  assert run["tokens"] == tokens and run["bytes"] == 53
  assert run["ppl"] == pytest.approx(v, rel=1e-5)
  assert run["bpb"] == pytest.approx(tokens * math.log2(v) / 53, rel=1e-5)
  assert run["documents"][1]["bpb"] == pytest.approx(2 * math.log2(v) / 2, rel=1e-5)


@pytest.mark.parametrize("n, stride", [(4, 4), (8, 4), (12, 4)])
def test_bigram_model_equals_hand_computation(n, stride):
  v, eos = 9, 8
  rng = np.random.default_rng(0)
  table = rng.normal(size=(v, v)).astype(np.float32)
  toks = [list(rng.integers(0, 8, 13)) + [eos], [3, eos], list(rng.integers(0, 8, 4)) + [eos]]
  docs = _docs(toks, doc_bytes=[20, 3, 9])
  c = eval_lib.Contender("bigram", _bigram_fn, jnp.asarray(table), False)
  nll = eval_lib.score_documents(c, docs, eos, eval_lib.EvalSettings(
      seq_len=n, stride=stride, batch_size=2, progress=False))
  logp = table - np.log(np.exp(table).sum(-1, keepdims=True))
  total = 0.0
  for d, t in enumerate(toks):
    prev = [eos] + t[:-1]
    want = np.array([-logp[a, b] for a, b in zip(prev, t)])
    np.testing.assert_allclose(nll[d], want, rtol=1e-5, atol=1e-6)
    total += want.sum()
  run = eval_lib.summarize("bigram", "-", nll, docs)
  assert run["ppl"] == pytest.approx(math.exp(total / sum(map(len, toks))), rel=1e-5)
  assert run["bpb"] == pytest.approx(total / math.log(2) / 32, rel=1e-5)


def test_each_window_chunk_gets_its_own_neighbors():
  """The logits are uniform only where chunk u's first neighbor starts with chunk u's first
  token (what an identity retriever returns); any misalignment changes the NLL."""
  v, eos, m = 11, 10, 4

  def fn(params, inputs, neighbors):
    n = inputs.shape[1]
    if neighbors is None:  # t_0 after [eos]: no chunk, no neighbors
      return jnp.zeros(inputs.shape + (v,)) + params
    first = inputs[:, ::m]                               # [B, l]
    ok = neighbors[:, :, 0, 0] == first                  # [B, l]
    ok = jnp.repeat(ok, m, axis=1)[:, :n]
    return jnp.where(ok[..., None], 0.0, jnp.arange(v) * 1.0)[..., :v] + params

  rng = np.random.default_rng(1)
  toks = [list(rng.integers(0, 10, 21)) + [eos], list(rng.integers(0, 10, 6)) + [eos]]
  docs = _docs(toks, m=m)
  r = 2 * m
  nb_tokens = np.full((docs.num_chunks, 2, r), -1, np.int32)
  nb_tokens[:, 0, :m] = docs.chunks                          # identity retrieval
  table = sources.NeighborTable(np.zeros((docs.num_chunks, 2), np.int64), nb_tokens, "id")
  c = eval_lib.Contender("probe", fn, jnp.zeros(()), True)
  for n, stride in [(8, 4), (12, 8), (4, 4)]:
    nll = eval_lib.score_documents(c, docs, eos, eval_lib.EvalSettings(
        seq_len=n, stride=stride, batch_size=2, progress=False), table, k=1)
    # t_0 is scored without neighbors (the probe then sees -1 != token: skip it).
    for t in nll:
      np.testing.assert_allclose(t[1:], math.log(v), rtol=1e-5)


def test_chunk_totals_add_up():
  docs = _docs([[1, 2, 3, 4, 5, 6], [1, 6]], m=4, doc_bytes=[12, 5])
  nll = [np.arange(6, dtype=float), np.array([1.0, 2.0])]
  c_nll, c_tok, c_bytes = eval_lib.chunk_totals(nll, docs)
  np.testing.assert_allclose(c_nll, [0 + 1 + 2 + 3, 4 + 5, 3])
  np.testing.assert_array_equal(c_tok, [4, 2, 2])
  np.testing.assert_allclose(c_bytes, [8, 4, 5])


# --- end to end over a real database and saved checkpoints ---------------------------------

def test_end_to_end_report(world, tmp_path):
  out = str(tmp_path / "report.json")
  settings = eval_lib.EvalSettings(seq_len=2 * M, stride=M, ks=(1, 2), batch_size=4,
                                   progress=False)
  report = eval_lib.run_evaluation(world["retro"], corpus=world["corpus"],
                                   db_dir=world["db_dir"], baseline_workdir=world["base"],
                                   settings=settings, output=out)
  assert os.path.exists(out) and manifest_lib.read_json(out)["runs"][0]["k"] == "off"
  runs = {(r["model"].split("@")[0], str(r["k"])): r for r in report["runs"]}
  assert set(runs) == {("retro", "off"), ("retro", "1"), ("retro", "2"), ("base", "-"),
                       ("n-gram copy over base", "copy2")}
  tokens = report["data"]["tokens"]
  for r in runs.values():
    assert r["tokens"] == tokens and r["bytes"] == report["data"]["bytes"]
    assert np.isfinite(r["bpb"]) and r["ppl"] > 1
    # r(C) <= 1 always, so bpb(1.0) is the overall bpb; smaller alphas keep fewer bytes.
    assert r["bpb_alpha"]["1.0"]["bpb"] == pytest.approx(r["bpb"], rel=1e-6)
    fr = [r["bpb_alpha"][a]["fraction_of_bytes"] for a in r["bpb_alpha"]]
    assert fr == sorted(fr)
    assert sum(d["tokens"] for d in r["documents"]) == tokens
  # Retrieval changes a RETRO model's likelihoods; k=0 ("off") is a different number.
  assert runs[("retro", "1")]["bpb"] != runs[("retro", "off")]["bpb"]
  # The copied database document is found, by content, and warned about.
  assert any(m["reason"] == "same content" and m["key"].endswith("zz_leaked.txt")
             for m in report["documents_in_database"])
  assert any("appear in the database" in w for w in report["warnings"])
  # Its chunks are their own nearest neighbors: r(C) = 1.
  documents = runs[("retro", "off")]["documents"]
  leaked = [i for i, d in enumerate(documents) if d["key"].endswith("zz_leaked.txt")]
  assert len(leaked) == 1
  chunks = [-(-d["tokens"] // M) for d in documents]   # r(C) per chunk, documents in order
  ratios = np.asarray(report["leakage"]["r"])
  assert len(ratios) == sum(chunks)
  lo = sum(chunks[:leaked[0]])
  mine = ratios[lo:lo + chunks[leaked[0]]]
  assert (mine[:-1] == 1.0).all()                      # every full chunk (the last may be cut)
  others = np.delete(ratios, np.arange(lo, lo + len(mine)))
  assert others.mean() < 0.9
  assert any("copied verbatim" in w for w in report["warnings"])
  # The n-gram copy model over the same neighbors: its mixture with the baseline gains
  # most on the document its neighbors hold verbatim, and changes only windows it matches.
  base_docs = runs[("base", "-")]["documents"]
  copy_docs = runs[("n-gram copy over base", "copy2")]["documents"]
  gain = [b["bpb"] - c["bpb"] for b, c in zip(base_docs, copy_docs)]
  assert gain[leaked[0]] > 1.0 and gain[leaked[0]] == max(gain)
  per_bucket = runs[("n-gram copy over base", "copy2")]["bpb_buckets"]
  assert sum(b["fraction_of_bytes"] for b in per_bucket.values()) == pytest.approx(1.0)
  table = eval_lib.report_table(report)
  assert "bpb(0.125)" in table and "base@1" in table and "retro@1" in table


def test_live_service_and_precomputed_retrieval_give_the_same_report(world, tmp_path):
  """The three neighbor sources the README offers (local index, --retrieval_url, neighbors
  precomputed for an evaluation chunk store) score the same likelihoods; r(C) is computed
  from the 10 nearest chunks in every case."""
  from retro_jax.retrieval.db import retriever as retriever_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.jobs import precompute as pn_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.serve import server as server_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.store import chunk_store as chunk_store_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.store import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  settings = eval_lib.EvalSettings(seq_len=2 * M, stride=M, ks=(1, 2), batch_size=4,
                                   progress=False, retrieval_off=False)
  live = eval_lib.run_evaluation(world["retro"], corpus=world["corpus"],
                                 db_dir=world["db_dir"], settings=settings)
  retriever = retriever_lib.Retriever.open(world["db_dir"])
  server = server_lib.RetrievalServer(retriever, "127.0.0.1", 0, max_batch=256, max_k=10,
                                       max_body_bytes=1 << 22).start()
  try:
    remote = eval_lib.run_evaluation(world["retro"], corpus=world["corpus"],
                                     retrieval_url=server.url, settings=settings)
  finally:
    server.stop()
  store_dir, nb_dir = str(tmp_path / "eval_chunks"), str(tmp_path / "eval_neighbors")
  chunk_store_lib.build_chunk_store(corpus_lib.Corpus(world["corpus"]), retriever.tokenizer,
                                    store_dir, M)
  pn_lib.precompute_neighbors(world["db_dir"], nb_dir, k=10, query_store=store_dir)
  pre = eval_lib.run_evaluation(world["retro"], eval_chunks=store_dir, db_dir=world["db_dir"],
                                neighbors_dir=nb_dir, settings=settings)

  def numbers(report):
    return {str(r["k"]): (r["tokens"], r["bytes"], r["bpb"]) for r in report["runs"]}

  want = numbers(live)
  assert set(want) == {"1", "2"}
  for report in (remote, pre):
    got = numbers(report)
    assert got.keys() == want.keys()
    for k, (tokens, nbytes, bpb) in want.items():
      assert got[k][:2] == (tokens, nbytes) and got[k][2] == pytest.approx(bpb, rel=1e-6), k
    np.testing.assert_allclose(report["leakage"]["r"], live["leakage"]["r"])
    assert report["protocol"]["leakage_neighbors"] == 10
    assert report["retrieval"]["k_retrieved"] >= 10
  assert live["protocol"]["leakage_neighbors"] == 10


def test_a_sharded_database_gives_the_whole_ones_report(tmp_path):
  """Evaluation reads a sharded database (live retrieval over every shard, and neighbors
  precomputed on it) as it reads the same corpus built whole."""
  from retro_jax.retrieval.db import access
  from retro_jax.retrieval.jobs import precompute as pn_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.store import chunk_store as chunk_store_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.store import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  from test_sharded import make_whole_and_sharded  # pylint: disable=g-import-not-at-top
  whole, sharded_dir, _ = make_whole_and_sharded(str(tmp_path), 8, (3, 6), chunk_size=M)
  corpus = write_corpus(str(tmp_path / "eval_corpus"), 3, seed=7)
  workdir = save_workdir(str(tmp_path / "retro"), TINY, _params(TINY), whole)
  settings = eval_lib.EvalSettings(seq_len=2 * M, stride=M, ks=(1, 2), batch_size=4,
                                   progress=False, retrieval_off=False)
  reports = [eval_lib.run_evaluation(workdir, corpus=corpus, db_dir=db, settings=settings)
             for db in (whole, sharded_dir)]
  store_dir, nb_dir = str(tmp_path / "eval_chunks"), str(tmp_path / "eval_neighbors")
  tok = access.open_database(sharded_dir).tokenizer
  chunk_store_lib.build_chunk_store(corpus_lib.Corpus(corpus), tok, store_dir, M)
  pn_lib.precompute_neighbors(sharded_dir, nb_dir, k=10, query_store=store_dir)
  reports.append(eval_lib.run_evaluation(workdir, eval_chunks=store_dir, db_dir=sharded_dir,
                                         neighbors_dir=nb_dir, settings=settings))
  want = {r["k"]: (r["tokens"], r["bytes"], r["bpb"]) for r in reports[0]["runs"]}
  for report in reports[1:]:
    got = {r["k"]: (r["tokens"], r["bytes"], r["bpb"]) for r in report["runs"]}
    assert got.keys() == want.keys() == {1, 2}
    for k, (tokens, nbytes, bpb) in want.items():
      assert got[k][:2] == (tokens, nbytes) and got[k][2] == pytest.approx(bpb, rel=1e-6), k
    np.testing.assert_allclose(report["leakage"]["r"], reports[0]["leakage"]["r"])


def test_same_document_exclusion_removes_the_copy(world):
  settings = eval_lib.EvalSettings(seq_len=2 * M, ks=(1,), batch_size=4, progress=False,
                                   retrieval_off=False, exclude_same_document=True)
  report = eval_lib.run_evaluation(world["retro"], corpus=world["corpus"],
                                   db_dir=world["db_dir"], settings=settings)
  assert report["retrieval"]["exclude_same_document"] is True
  assert max(report["leakage"]["r"]) < 1.0


# --- bad input ------------------------------------------------------------------------------

def test_chunk_size_mismatch_is_refused_naming_both(world, tmp_path):
  cfg = TINY.replace(chunk_size=4)
  wd = save_workdir(str(tmp_path / "m4"), cfg, _params(cfg), world["db_dir"], seq_len=8)
  with pytest.raises(manifest_lib.ManifestMismatchError) as e:
    eval_lib.run_evaluation(wd, corpus=world["corpus"], db_dir=world["db_dir"],
                            settings=eval_lib.EvalSettings(progress=False))
  assert "chunk_size=4" in str(e.value) and "chunk_size=8" in str(e.value)


def test_tokenizer_mismatch_is_refused_naming_both(world, tmp_path):
  # A checkpoint trained on data tokenised with another tokenizer (same vocabulary size).
  other = str(tmp_path / "other_db")
  os.makedirs(os.path.join(other, "chunks"))
  man = manifest_lib.read_json(os.path.join(world["db_dir"], "chunks", "manifest.json"))
  man["tokenizer"] = dict(man["tokenizer"], sha256="f" * 64, file_name="spm.model",
                          kind="sentencepiece")
  manifest_lib.atomic_write_json(os.path.join(other, "chunks", "manifest.json"), man)
  wd = save_workdir(str(tmp_path / "othertok"), TINY, _params(TINY), other)
  model = ckpt_lib.load_model(wd)
  assert model.data_provenance["tokenizer"]["kind"] == "sentencepiece"
  with pytest.raises(manifest_lib.ManifestMismatchError) as e:
    eval_lib.run_evaluation(wd, corpus=world["corpus"], db_dir=world["db_dir"],
                            settings=eval_lib.EvalSettings(progress=False))
  msg = str(e.value)
  assert "tokenizer mismatch" in msg and "spm.model" in msg and "tokenizer.json" in msg


def test_empty_corpus_is_a_clear_error(world, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "blank.txt").write_text("   \n")
  with pytest.raises(options_lib.SourceError, match="no usable document"):
    eval_lib.run_evaluation(world["retro"], corpus=str(empty), db_dir=world["db_dir"],
                            settings=eval_lib.EvalSettings(progress=False))


def test_service_down_is_a_clear_error_fast(world):
  import socket  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.serve import client as client_lib  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]  # closed when the block ends: nobody listens there
  with pytest.raises(client_lib.ServiceUnavailableError, match="not reachable"):
    eval_lib.run_evaluation(world["retro"], corpus=world["corpus"],
                            retrieval_url=f"http://127.0.0.1:{port}",
                            settings=eval_lib.EvalSettings(progress=False),
                            service_timeout=5)


def test_missing_workdir_is_a_clear_error(tmp_path):
  with pytest.raises(ckpt_lib.CheckpointError, match="not found"):
    ckpt_lib.load_model(str(tmp_path / "nope"))


def test_cli_exits_cleanly_on_bad_input(world, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "blank.txt").write_text("\n")
  proc = subprocess.run(
      [sys.executable, "-m", "retro_jax.evaluate", f"--workdir={world['retro']}",
       f"--corpus={empty}", f"--db_dir={world['db_dir']}", "--ks=1"],
      cwd=ROOT, env=_cli_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert "no usable document" in proc.stderr and "Traceback" not in proc.stderr
