"""The lm-evaluation-harness adapter (retro_jax/harness): its three request types agree with
the model's own forward pass, evaluation and generation, and a task defined over a local
jsonl runs through lm-eval, from Python and from the command line."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-eval is not installed (pip install 'retro_jax[lm_eval]')")

from lm_eval.api.instance import Instance  # pylint: disable=g-import-not-at-top,g-bad-import-order
from retro_jax.evaluation import evaluate as evaluate_lib  # pylint: disable=g-bad-import-order
from retro_jax.evaluation import eval_config
from retro_jax.evaluation import scoring
from retro_jax.evaluation import sources
from retro_jax.generation import sampler
from retro_jax.harness import adapter
from retro_jax.model import Retro
from test_evaluate import M, ROOT, TINY, _cli_env, _docs, _params, world  # pylint: disable=g-bad-import-order,unused-import

K = 2


@pytest.fixture(scope="module")
def lm(world):  # pylint: disable=redefined-outer-name
  return adapter.RetroLM(world["retro"], db=world["db_dir"], k=K, batch_size=4)


def _texts(world, n=3):  # pylint: disable=redefined-outer-name
  d = os.path.join(world["root"], "db_corpus")
  out = []
  for name in sorted(os.listdir(d))[:n]:
    with open(os.path.join(d, name), encoding="utf-8") as f:
      out.append(f.read())
  return out


def _req(kind, args, i=0):
  return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def test_loglikelihood_is_the_forward_pass_over_live_neighbors(lm, world):  # pylint: disable=redefined-outer-name
  text = _texts(world)[0]
  pairs = [(text[:40], text[40:90]), (text[:7], text[7:30]), ("", text[:25])]
  got = lm.loglikelihood([_req("loglikelihood", p, i) for i, p in enumerate(pairs)])
  retriever = lm.session.retriever
  for (ctx, cont), (ll, greedy) in zip(pairs, got):
    c_ids, n_ids = lm._split_tokens(ctx, cont)  # pylint: disable=protected-access
    seq = np.asarray([lm.eot_token_id] + c_ids + n_ids, np.int32)[-(lm.seq_len + 1):]
    x, y = seq[:-1], seq[1:]
    full = len(x) // M
    nb = np.full((1, -(-len(x) // M), K, 2 * M), -1, np.int32)
    if full:  # every complete chunk retrieves with its own tokens
      nb[0, :full] = retriever.retrieve_chunks(x[:full * M].reshape(full, M), K).tokens
    logp = jax.nn.log_softmax(Retro(TINY).apply({"params": _params(TINY)}, jnp.asarray(x[None]),
                                                jnp.asarray(nb)), axis=-1)[0]
    picked = np.asarray(logp)[np.arange(len(y)), y][-len(n_ids):]
    assert ll == pytest.approx(float(picked.sum()), rel=1e-4, abs=1e-3)
    assert greedy == bool((np.asarray(logp).argmax(-1)[-len(n_ids):] == y[-len(n_ids):]).all())
  # The neighbors are read: scoring without them gives other numbers.
  off = adapter.RetroLM(world["retro"], db=world["db_dir"], retrieval="off", batch_size=4)
  assert off.loglikelihood([_req("loglikelihood", pairs[0])])[0][0] != pytest.approx(
      got[0][0], abs=1e-4)


def test_rolling_loglikelihood_equals_retro_evaluate_scoring(lm, world):  # pylint: disable=redefined-outer-name
  texts = _texts(world, 2)
  got = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (t,), i)
                                  for i, t in enumerate(texts)])
  tokens = [np.asarray(lm.tok_encode(t), np.int32) for t in texts]
  assert all(len(t) > 3 * lm.seq_len for t in tokens)  # several windows each
  docs = _docs(tokens, m=M)
  table = sources.retrieve_table(lm.session.retriever, docs, K, progress=False)
  contender = evaluate_lib.Contender("retro", scoring.retro_logits_fn(TINY), _params(TINY),
                                     True)
  settings = eval_config.EvalSettings(seq_len=lm.seq_len, stride=lm.seq_len // 2,
                                      batch_size=4, progress=False)
  want = evaluate_lib.score_documents(contender, docs, lm.eot_token_id, settings, table, K)
  for g, w in zip(got, want):
    assert g == pytest.approx(-float(w.sum()), rel=1e-4)


def test_generate_until_is_greedy_generation_cut_at_the_stop_string(lm, world):  # pylint: disable=redefined-outer-name
  text = _texts(world)[1]
  ctx = text[:50]
  full = lm.generate_until([_req("generate_until", (ctx, {"max_gen_toks": 20}))])[0]
  prompt = [lm.eot_token_id] + lm.tok_encode(ctx)
  gen = sampler.Generator(_params(TINY), TINY, lm.tok, lm.session.retriever, K)
  want = gen.generate_tokens([prompt], sampler.SamplingParams(max_new_tokens=20,
                                                              temperature=0.0))[0]
  assert full == want.text and want.neighbor_ids.size  # retrieval ran while generating
  stop = full[3:5] if len(full) >= 5 else None
  if stop:
    cut = lm.generate_until([_req("generate_until", (ctx, {"max_gen_toks": 20,
                                                           "until": [stop]}))])[0]
    assert cut == full[:full.index(stop)]


def _write_task(root, texts):
  """A multiple-choice task and a rolling-perplexity task over one local jsonl."""
  data = os.path.join(root, "local.jsonl")
  with open(data, "w", encoding="utf-8") as f:
    for i, t in enumerate(texts):
      right = t[60:100]
      wrong = texts[(i + 1) % len(texts)][60:100]
      f.write(json.dumps({"context": t[:60], "choices": [right, wrong], "label": 0,
                          "text": t[:300]}) + "\n")
  common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n" \
           "test_split: test\n"
  with open(os.path.join(root, "retro_local_mc.yaml"), "w", encoding="utf-8") as f:
    f.write("task: retro_local_mc\n" + common + "output_type: multiple_choice\n"
            "doc_to_text: \"{{context}}\"\ndoc_to_choice: \"{{choices}}\"\n"
            "doc_to_target: \"{{label}}\"\ntarget_delimiter: \"\"\n"
            "metric_list:\n  - metric: acc\n")
  with open(os.path.join(root, "retro_local_ppl.yaml"), "w", encoding="utf-8") as f:
    f.write("task: retro_local_ppl\n" + common + "output_type: loglikelihood_rolling\n"
            "doc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
            "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
  return root


def test_a_local_task_runs_through_lm_eval(lm, world, tmp_path, monkeypatch):  # pylint: disable=redefined-outer-name
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  texts = _texts(world, 4)
  tasks = _write_task(str(tmp_path), texts)
  from lm_eval import simple_evaluate  # pylint: disable=g-import-not-at-top
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  res = simple_evaluate(model=lm, tasks=["retro_local_mc", "retro_local_ppl"],
                        task_manager=TaskManager(include_path=tasks))["results"]
  # The harness's accuracy is the share of docs whose right choice scores higher here.
  scores = lm.loglikelihood([_req("loglikelihood", (t[:60], c), 0) for t in texts
                             for c in (t[60:100], texts[(texts.index(t) + 1) % 4][60:100])])
  acc = np.mean([scores[2 * i][0] > scores[2 * i + 1][0] for i in range(4)])
  assert res["retro_local_mc"]["acc,none"] == pytest.approx(acc)
  # bits per byte: our rolling NLL over the UTF-8 bytes of the texts.
  rolled = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (t[:300],)) for t in texts])
  bpb = -sum(rolled) / np.log(2) / sum(len(t[:300].encode()) for t in texts)
  assert res["retro_local_ppl"]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-4)


def test_the_command_line(world, tmp_path):  # pylint: disable=redefined-outer-name
  tasks = _write_task(str(tmp_path), _texts(world, 4))
  proc = subprocess.run(
      [sys.executable, "-m", "retro_jax.harness", "--model", "retro_jax", "--model_args",
       f"workdir={world['retro']},db={world['db_dir']},k={K}", "--batch_size", "4",
       "--include_path", tasks, "--tasks", "retro_local_mc", "--output_path",
       str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(_cli_env(), HF_DATASETS_OFFLINE="1", PYTHONPATH=ROOT), check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "retro_local_mc" in proc.stdout and "acc" in proc.stdout
