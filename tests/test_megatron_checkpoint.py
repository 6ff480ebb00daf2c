"""Reading Megatron's legacy RETRO checkpoints: the torch-free reader, the TP merge, bad input.

The merge is checked against megatron-core itself: a tiny random megatron-core RetroModel
(release-like: RoPE on half of each head, LayerNorm-1p, SwiGLU, no linear biases, untied
embeddings, CCA from layer 9) is written in the legacy layout over 2 and 4 tensor-parallel
ranks by tests/megatron_ref.py, and every merged tensor must equal the model's own.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import megatron_ref  # noqa: E402  pylint: disable=wrong-import-position

from retro_jax.megatron import legacy  # noqa: E402
from retro_jax.megatron import torch_pickle  # noqa: E402

needs_mcore = pytest.mark.skipif(not megatron_ref.AVAILABLE, reason=megatron_ref.SKIP_REASON)


@pytest.fixture(scope="module")
def tiny_model():
  args = megatron_ref.legacy_args()
  return args, megatron_ref.build_model(args, seed=1)


def _save(tiny_model, directory, tp, **kwargs):
  args, model = tiny_model
  args = argparse.Namespace(**{**vars(args), "tensor_model_parallel_size": tp})
  return megatron_ref.save_legacy(model, args, str(directory), tp, **kwargs)


@needs_mcore
def test_reader_matches_torch_load(tmp_path):
  import torch
  saved = {"a": torch.randn(3, 5), "b": torch.randn(4, 6).to(torch.bfloat16).t(),
           "c": torch.arange(7), "d": torch.randn(2, 3, 4).half()[:, 1:],
           "args": argparse.Namespace(x=1, params_dtype=torch.bfloat16)}
  path = tmp_path / "x.pt"
  torch.save(saved, path)
  got = torch_pickle.load(str(path))
  for key in "abcd":
    ours = got[key].numpy()
    assert ours.shape == tuple(saved[key].shape)
    np.testing.assert_array_equal(ours.astype(np.float64), saved[key].double().numpy())
  assert got["args"].x == 1 and str(got["args"].params_dtype) == "torch.bfloat16"


@needs_mcore
@pytest.mark.parametrize("tp", [2, 4])
def test_merge_reproduces_megatron_core_tensors(tiny_model, tmp_path, tp):
  _save(tiny_model, tmp_path, tp)
  arch, shards = legacy.open_checkpoint(str(tmp_path))
  assert arch.tensor_parallel == tp and arch.cca_layers == (9, 12, 15)
  merged = dict(legacy.merged_tensors(arch, shards))
  ref = megatron_ref.state_dict(tiny_model[1])
  assert set(merged) == set(ref)
  for name, value in ref.items():
    np.testing.assert_allclose(merged[name].astype(np.float32), value, rtol=0, atol=1e-6, err_msg=name)


@needs_mcore
def test_merge_reads_older_spelling_and_bf16(tiny_model, tmp_path):
  """*_layernorm key names (older Megatron) and bfloat16 shards merge the same way."""
  import torch
  _save(tiny_model, tmp_path, 2, dtype=torch.bfloat16, older_spelling=True, iteration="100")
  arch, shards = legacy.open_checkpoint(str(tmp_path))
  merged = dict(legacy.merged_tensors(arch, shards))
  ref = megatron_ref.state_dict(tiny_model[1])
  for name, value in ref.items():
    np.testing.assert_allclose(merged[name].astype(np.float32), value, rtol=2 ** -7, atol=2 ** -7, err_msg=name)


# --- bad input: one line naming the file ----------------------------------------------------------

def _one_line(error) -> str:
  text = str(error)
  assert "\n" not in text and "Traceback" not in text
  return text


@needs_mcore
def test_missing_shard(tiny_model, tmp_path):
  paths = _save(tiny_model, tmp_path, 4)
  os.remove(paths[2])
  with pytest.raises(legacy.CheckpointFileError) as e:
    legacy.open_checkpoint(str(tmp_path))
  assert "mp_rank_02" in _one_line(e.value)


@needs_mcore
def test_mixed_tensor_parallel_sizes(tiny_model, tmp_path):
  two, four = tmp_path / "two", tmp_path / "four"
  _save(tiny_model, two, 2)
  paths = _save(tiny_model, four, 4)
  os.replace(two / "release" / "mp_rank_01" / "model_optim_rng.pt", paths[1])
  with pytest.raises(legacy.CheckpointFileError) as e:
    legacy.open_checkpoint(str(four))
  assert "mp_rank_01" in _one_line(e.value) and "tensor_model_parallel_size" in str(e.value)


@needs_mcore
@pytest.mark.parametrize("flag,value", [("num_experts", 8), ("position_embedding_type", "alibi"),
                                        ("apply_residual_connection_post_layernorm", True)])
def test_unknown_architecture_flag(tiny_model, tmp_path, flag, value):
  import torch
  paths = _save(tiny_model, tmp_path, 2)
  ckpt = torch.load(paths[0], weights_only=False)   # our own file: rewrite rank 0's args
  ckpt["args"] = argparse.Namespace(**{**vars(ckpt["args"]), flag: value})
  torch.save(ckpt, paths[0])
  with pytest.raises(legacy.ArchitectureError) as e:
    legacy.open_checkpoint(str(tmp_path))
  assert f"args.{flag}" in _one_line(e.value) and "mp_rank_00" in str(e.value)


@needs_mcore
def test_truncated_file(tiny_model, tmp_path):
  paths = _save(tiny_model, tmp_path, 2)
  size = os.path.getsize(paths[1])
  with open(paths[1], "r+b") as f:
    f.truncate(size // 2)
  with pytest.raises(torch_pickle.CheckpointFileError) as e:
    legacy.open_checkpoint(str(tmp_path))
  assert paths[1] in _one_line(e.value)


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@needs_mcore
def test_forbidden_class_is_refused_without_running(tmp_path):
  import torch
  marker = tmp_path / "ran"
  path = tmp_path / "evil.pt"
  torch.save({"args": argparse.Namespace(), "model": {"x": torch.zeros(2)},
              "payload": _Evil(marker)}, path)
  with pytest.raises(torch_pickle.ForbiddenClassError) as e:
    torch_pickle.load(str(path))
  assert str(path) in _one_line(e.value) and "system" in str(e.value)
  assert not marker.exists()


def test_forbidden_class_in_a_handmade_zip(tmp_path):
  """The same refusal without torch: a zip with a data.pkl that asks for builtins.eval."""
  import zipfile
  path = tmp_path / "evil.pt"
  payload = pickle.dumps({"model": _EvalPayload()}, protocol=2)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr("archive/data.pkl", payload)
  with pytest.raises(torch_pickle.ForbiddenClassError) as e:
    torch_pickle.load(str(path))
  assert "builtin__.eval" in _one_line(e.value)  # protocol 2 spells builtins __builtin__


class _EvalPayload:
  def __reduce__(self):
    return (eval, ("1 + 1",))


def test_not_a_checkpoint_directory(tmp_path):
  with pytest.raises(legacy.CheckpointFileError) as e:
    legacy.open_checkpoint(str(tmp_path))
  assert "latest_checkpointed_iteration.txt" in _one_line(e.value)


def test_torch_free_writer_round_trip(tmp_path):
  """torch_pickle.save writes what torch_pickle.load (and torch.load, where installed) reads."""
  import ml_dtypes
  rng = np.random.default_rng(0)
  arrays = {"f": rng.standard_normal((3, 5)).astype(np.float32),
            "b": rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16),
            "i": np.arange(6, dtype=np.int64).reshape(2, 3)}
  obj = {"args": argparse.Namespace(num_layers=2, name="x", gate=None),
         "model": {"language_model": dict(arrays)}, "iteration": 7}
  path = str(tmp_path / "w.pt")
  torch_pickle.save(obj, path)
  got = torch_pickle.load(path)
  assert vars(got["args"]) == vars(obj["args"]) and got["iteration"] == 7
  for key, value in arrays.items():
    ours = got["model"]["language_model"][key].numpy()
    assert ours.dtype == value.dtype
    np.testing.assert_array_equal(ours, value)
  if megatron_ref.TORCH:
    import torch
    loaded = torch.load(path, weights_only=False, mmap=True)
    for key, value in arrays.items():
      np.testing.assert_array_equal(
          loaded["model"]["language_model"][key].float().numpy(), value.astype(np.float32))
