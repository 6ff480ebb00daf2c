"""Generation: KV-cache decoding with live retrieval equals the full forward pass; sampling
filters; bad input."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax import fileio as manifest_lib
from retro_jax import options as options_lib
from retro_jax.generation import sampler
from retro_jax.inference import session as session_lib
from retro_jax.model import Retro
from retro_jax.retrieval.db import retriever as retriever_lib
from test_evaluate import M, ROOT, TINY, _cli_env, _params, save_workdir, world  # pylint: disable=g-bad-import-order,unused-import

K = 2


@pytest.fixture(scope="module")
def retriever(world):  # pylint: disable=redefined-outer-name
  return retriever_lib.Retriever.open(world["db_dir"])


def test_incremental_generation_with_live_retrieval_equals_full_forward(retriever):
  store = retriever.store
  flat = np.asarray(store.tokens).reshape(-1)
  flat = flat[flat >= 0]
  # Two groups of two prompts (lengths 11 and 5: not multiples of m), taken from real text.
  prompts = [flat[0:11], flat[40:51], flat[100:105], flat[200:205]]
  prompts = [p.tolist() for p in prompts]
  steps = 3 * M - 4  # crosses several chunk boundaries in the decode loop for both groups
  gen = sampler.Generator(_params(TINY), TINY, retriever.tokenizer, retriever, K)
  outs = gen.generate_tokens(prompts, sampler.SamplingParams(
      max_new_tokens=steps, temperature=1.0, top_k=50, seed=3, stop_at_eos=False),
                             return_logits=True)
  fed = [sampler.fed_tokens(g) for g in outs]
  n = max(len(f) for f in fed)
  tokens = np.zeros((len(fed), n), np.int32)   # right padding changes no earlier logit
  neighbors = np.full((len(fed), TINY.num_chunks(n), K, 2 * M), -1, np.int32)
  for i, (g, f) in enumerate(zip(outs, fed)):
    assert len(g.tokens) == steps and g.stop_reason == "length"
    tokens[i, :len(f)] = f
    done = len(f) // M  # chunks completed by fed tokens: each retrieved once, live
    assert g.neighbor_tokens.shape == (done, K, 2 * M)
    neighbors[i, :done] = g.neighbor_tokens
    # Live retrieval used each chunk's own tokens.
    chunks = np.asarray(f[:done * M]).reshape(done, M)
    want = retriever.retrieve_chunks(chunks, K)
    np.testing.assert_array_equal(g.neighbor_ids, want.ids)
    np.testing.assert_array_equal(g.neighbor_tokens, want.tokens)
  assert (neighbors >= 0).any()
  full = np.asarray(Retro(TINY).apply({"params": _params(TINY)}, jnp.asarray(tokens),
                                      jnp.asarray(neighbors)))
  for i, (g, f) in enumerate(zip(outs, fed)):
    assert g.logits.shape == (len(f), TINY.vocab_size)
    np.testing.assert_allclose(g.logits, full[i, :len(f)], atol=2e-4, rtol=1e-4)
  # And the sampled tokens really were drawn from those logits' support (top-k=50).
  for g, f in zip(outs, fed):
    p = len(g.prompt_tokens)
    for t, tok in enumerate(g.tokens):
      row = g.logits[p - 1 + t]
      assert row[tok] >= np.sort(row)[-50] - 1e-4


def test_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  keep = lambda x: np.isfinite(np.asarray(x))[0].tolist()
  assert keep(sampler.filter_logits(logits, 1.0, 2, 1.0)) == [True, True, False, False, False]
  # Nucleus: the smallest prefix with mass >= 0.8 is 0.5 + 0.2 + 0.15.
  assert keep(sampler.filter_logits(logits, 1.0, 0, 0.8)) == [True, True, True, False, False]
  assert keep(sampler.filter_logits(logits, 1.0, 0, 0.3)) == [True, False, False, False, False]
  assert all(keep(sampler.filter_logits(logits, 1.0, 0, 1.0)))
  keys = jnp.zeros((1, 2), jnp.uint32)
  assert int(sampler.sample_tokens(logits, keys, 0.0, 0, 1.0, greedy=True)[0]) == 0
  draws = {int(sampler.sample_tokens(logits, jnp.asarray([[0, s]], jnp.uint32), 1.0, 2, 1.0,
                                     greedy=False)[0]) for s in range(40)}
  assert draws == {0, 1}


def test_sampling_frequencies_follow_temperature_and_top_p():
  """4000 draws per setting against the distribution written out: softmax(logits / T), then
  the smallest most-probable set with mass >= top_p (of the tempered distribution),
  renormalised."""
  probs = np.array([0.4, 0.3, 0.2, 0.1])
  draws = 4000
  rows = jnp.repeat(jnp.log(jnp.asarray(probs, jnp.float32))[None], draws, axis=0)
  keys = jax.random.split(jax.random.PRNGKey(0), draws)
  for temperature, top_p in ((0.5, 1.0), (2.0, 1.0), (0.5, 0.8), (1.0, 0.6)):
    want = probs ** (1 / temperature)
    want /= want.sum()
    before = np.cumsum(want) - want        # sorted already: mass of the more likely tokens
    want = np.where(before < top_p, want, 0.0)
    want /= want.sum()
    got = np.bincount(np.asarray(sampler.sample_tokens(rows, keys, temperature, 0, top_p,
                                                       greedy=False)), minlength=4) / draws
    np.testing.assert_allclose(got, want, atol=0.03, err_msg=f"T={temperature} p={top_p}")


def test_empty_prompt_is_a_clear_error(world):  # pylint: disable=redefined-outer-name
  with pytest.raises(sampler.GenerationError, match="empty prompt"):
    sampler.run_generation(world["retro"], ["  "], db_dir=world["db_dir"])
  gen = sampler.Generator(_params(TINY), TINY, None)
  with pytest.raises(sampler.GenerationError, match="at least one token"):
    gen.generate_tokens([[1, 2], []])
  with pytest.raises(sampler.GenerationError, match="top_p"):
    sampler.SamplingParams(top_p=0).validate()


def test_service_down_is_a_clear_error(world):  # pylint: disable=redefined-outer-name
  import socket  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.serve import client as client_lib
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  with pytest.raises(client_lib.ServiceUnavailableError, match="not reachable"):
    sampler.run_generation(world["retro"], ["alpha beta"],
                           retrieval_url=f"http://127.0.0.1:{port}", service_timeout=5)


def test_chunk_size_mismatch_is_refused(world, tmp_path):  # pylint: disable=redefined-outer-name
  cfg = TINY.replace(chunk_size=4)
  wd = save_workdir(str(tmp_path / "m4"), cfg, _params(cfg), world["db_dir"], seq_len=8)
  with pytest.raises(manifest_lib.ManifestMismatchError) as e:
    sampler.run_generation(wd, ["alpha beta"], db_dir=world["db_dir"])
  assert "chunk_size=4" in str(e.value) and "chunk_size=8" in str(e.value)


def test_cli_generates_and_exits_cleanly_on_bad_input(world):  # pylint: disable=redefined-outer-name
  base = [sys.executable, "-m", "retro_jax.generate", f"--workdir={world['retro']}",
          f"--db_dir={world['db_dir']}"]
  proc = subprocess.run(base + ["--prompt=", "--max_new_tokens=3"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert "empty prompt" in proc.stderr and "Traceback" not in proc.stderr
  proc = subprocess.run(base + ["--prompt=alpha beta gamma", "--max_new_tokens=3",
                                "--temperature=0"], cwd=ROOT, env=_cli_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "=== prompt: 'alpha beta gamma'" in proc.stdout and "alpha beta gamma" in proc.stdout


def test_sources_refuse_two_retrieval_sources():
  with pytest.raises(options_lib.SourceError, match="exactly one"):
    session_lib.open_live_retriever("a", "http://b")
