"""`python -m retro_jax.import_megatron`: a converted checkpoint is a workdir like any other;
bad input ends in one line naming the file, and nothing is written as if complete."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import megatron_ref  # noqa: E402  pylint: disable=wrong-import-position

from retro_jax.megatron import convert, legacy, torch_pickle  # noqa: E402

pytestmark = pytest.mark.skipif(not megatron_ref.AVAILABLE, reason=megatron_ref.SKIP_REASON)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model():
  args = megatron_ref.legacy_args(tensor_model_parallel_size=2)
  return args, megatron_ref.build_model(args, seed=5)


def _cli(*flags):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "retro_jax.import_megatron", *flags], env=env,
                        capture_output=True, text=True, timeout=600)


def _nothing_written(output):
  parent = os.path.dirname(output)
  leftovers = [n for n in os.listdir(parent) if n.startswith(os.path.basename(output))]
  assert not leftovers, leftovers


def test_cli_converts_and_load_model_reads_it(model, tmp_path):
  from retro_jax.inference import checkpoints  # pylint: disable=g-import-not-at-top
  args, m = model
  megatron_ref.save_legacy(m, args, str(tmp_path / "ckpt"), 2)
  out = str(tmp_path / "workdir")
  proc = _cli(f"--checkpoint={tmp_path / 'ckpt'}", f"--output={out}", "--cca_scale=0")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "CCA at [9, 12, 15]" in proc.stdout
  loaded = checkpoints.load_model(out)
  assert loaded.config.cca_scale == 0.0 and loaded.config.retrieval_wiring == "megatron"
  assert not os.path.exists(os.path.join(out, "staging"))
  proc = _cli(f"--checkpoint={tmp_path / 'ckpt'}", f"--output={out}")
  assert proc.returncode == 1 and "already holds checkpoints" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1


def test_a_bfloat16_checkpoint_converts_and_loads_with_its_content_check(model, tmp_path):
  # NVIDIA's releases are bfloat16: the converted workdir keeps bfloat16 matrices, and
  # load_model must check their fingerprints in that dtype before casting (it once compared
  # the float32 cast against the bfloat16 fingerprint and refused every converted release).
  from retro_jax.inference import checkpoints  # pylint: disable=g-import-not-at-top
  args, m = model
  megatron_ref.save_legacy(m, args, str(tmp_path / "ckpt"), 2, dtype="bfloat16")
  out = str(tmp_path / "workdir")
  convert.convert(str(tmp_path / "ckpt"), out)
  loaded = checkpoints.load_model(out)  # the content check is on by default
  emb = np.asarray(loaded.params["embed"]["embedding"])
  assert emb.dtype == np.float32
  ref = megatron_ref.state_dict(m)["embedding.word_embeddings.weight"]
  np.testing.assert_array_equal(emb, np.asarray(ref, np.float32).astype(
      __import__("ml_dtypes").bfloat16).astype(np.float32))


def test_cli_bad_input_is_one_line(model, tmp_path):
  args, m = model
  paths = megatron_ref.save_legacy(m, args, str(tmp_path / "ckpt"), 2)
  os.remove(paths[1])
  out = str(tmp_path / "workdir")
  proc = _cli(f"--checkpoint={tmp_path / 'ckpt'}", f"--output={out}")
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("import_megatron: error: ")
  assert "mp_rank_01" in lines[0]
  _nothing_written(out)


def _bad(kind, args, m, directory):
  """A checkpoint directory broken in one way."""
  import torch  # pylint: disable=g-import-not-at-top
  if kind == "mixed_tp":
    megatron_ref.save_legacy(m, args, str(directory / "two"), 2)
    four = argparse.Namespace(**{**vars(args), "tensor_model_parallel_size": 4})
    paths = megatron_ref.save_legacy(m, four, str(directory), 4)
    os.replace(directory / "two" / "release" / "mp_rank_01" / "model_optim_rng.pt", paths[1])
    return "mp_rank_01"
  paths = megatron_ref.save_legacy(m, args, str(directory), 2)
  if kind == "missing_shard":
    os.remove(paths[1])
    return "mp_rank_01"
  if kind == "unknown_flag":
    ckpt = torch.load(paths[0], weights_only=False)
    ckpt["args"] = argparse.Namespace(**{**vars(ckpt["args"]), "num_experts": 8})
    torch.save(ckpt, paths[0])
    return "args.num_experts"
  if kind == "truncated":
    with open(paths[1], "r+b") as f:
      f.truncate(os.path.getsize(paths[1]) - 100)
    return "mp_rank_01"
  if kind == "forbidden_class":
    torch_pickle.save({"args": args, "model": {}, "x": _Reference("os", "system")}, paths[0])
    return "os.system"
  raise ValueError(kind)


class _Reference:
  def __init__(self, module, name):
    self.ref = torch_pickle._Global(module, name)  # pylint: disable=protected-access

  def __reduce__(self):
    return (self.ref, ("true",))


@pytest.mark.parametrize("kind", ["missing_shard", "mixed_tp", "unknown_flag", "truncated",
                                  "forbidden_class"])
def test_bad_input_writes_nothing(model, tmp_path, kind):
  args, m = model
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  named = _bad(kind, args, m, ckpt)
  out = str(tmp_path / "workdir")
  with pytest.raises(ValueError) as e:
    convert.convert(str(ckpt), out)
  message = str(e.value)
  assert "\n" not in message and named in message, message
  _nothing_written(out)


def test_evaluate_and_generate_on_a_converted_checkpoint(tmp_path):
  """A converted checkpoint with the database's tokenizer: evaluate (live retrieval) and
  generate (KV cache, retrieval every chunk) run on it like on any workdir."""
  from test_build_db import make_db  # pylint: disable=g-import-not-at-top
  from retro_jax.evaluation import evaluate as eval_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.generation import sampler  # pylint: disable=g-import-not-at-top
  from retro_jax.generation.generate_config import SamplingParams  # pylint: disable=g-import-not-at-top
  m = 8
  db = make_db(str(tmp_path), num_docs=6, chunk_size=m, dim=32)
  tokenizer = str(tmp_path / "tok" / "tokenizer.json")        # make_db's LM tokenizer
  args = megatron_ref.legacy_args(padded_vocab_size=30528, tensor_model_parallel_size=2,
                                  retro_chunk_length=m, num_layers=9)   # CCA at 6 and 9
  megatron_ref.save_legacy(megatron_ref.build_model(args, seed=2), args, str(tmp_path / "ckpt"),
                           2)
  out = str(tmp_path / "workdir")
  convert.convert(str(tmp_path / "ckpt"), out, tokenizer=tokenizer)
  assert os.path.exists(os.path.join(out, "tokenizer", "tokenizer.json"))
  settings = eval_lib.EvalSettings(seq_len=4 * m, stride=2 * m, ks=(2,), batch_size=2,
                                   progress=False)
  corpus = os.path.join(str(tmp_path), "db_corpus")
  report = eval_lib.run_evaluation(out, corpus=corpus, db_dir=db, settings=settings)
  runs = {str(r["k"]): r for r in report["runs"]}
  assert set(runs) >= {"off", "2"} and all(np.isfinite(r["bpb"]) for r in runs.values())
  gens = sampler.run_generation(out, ["def main():"], db_dir=db,
                                sampling=SamplingParams(max_new_tokens=2 * m, temperature=0))
  assert len(gens[0].tokens) + (gens[0].stop_reason == "eos") > 0
  assert (gens[0].neighbor_ids >= 0).any()    # it retrieved while generating
