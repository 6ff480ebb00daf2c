"""NVIDIA's Megatron RETRO in retro_jax: logits of converted checkpoints equal megatron-core's.

A tiny random megatron-core 0.15.3 RetroModel (with the legacy fixes of tests/megatron_ref.py:
final norm, encoder residual, retro_attention_gate) is saved in the legacy layout over 2 and
4 tensor-parallel ranks, converted with `python -m retro_jax.import_megatron`'s library call,
loaded with load_model like any workdir, and run on the same tokens and neighbors: the max
abs logit difference must be <= 1e-4 in float32, with retrieval (gate 1) and with the gate
at 0 (what NVIDIA's instruction tuning and generation used).  Two architectures: the
release's (RoPE on half of each head, LayerNorm-1p, SwiGLU, no linear biases, untied
embeddings, 16 layers so CCA starts at 9) and the other branches of the code (learned
absolute positions, which also reach the neighbors; squared ReLU; biases; tied embeddings;
plain LayerNorm; 9 layers so CCA starts at 6).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import megatron_ref  # noqa: E402  pylint: disable=wrong-import-position

from retro_jax import config as config_lib  # noqa: E402
from retro_jax import model as model_lib  # noqa: E402
from retro_jax.inference import checkpoints  # noqa: E402
from retro_jax.megatron import convert, legacy  # noqa: E402

pytestmark = pytest.mark.skipif(not megatron_ref.AVAILABLE, reason=megatron_ref.SKIP_REASON)

TOL = 1e-4
VARIANTS = {
    "release": {},
    "other": dict(num_layers=9, position_embedding_type="learned_absolute", swiglu=False,
                  squared_relu=True, add_bias_linear=True, apply_layernorm_1p=False,
                  untie_embeddings_and_output_weights=False, ffn_hidden_size=64),
}
_MODELS = {}


def _model(variant):
  if variant not in _MODELS:
    args = megatron_ref.legacy_args(**VARIANTS[variant])
    _MODELS[variant] = (args, megatron_ref.build_model(args, seed=3))
  return _MODELS[variant]


def _inputs(args, seed=0):
  rng = np.random.default_rng(seed)
  m, k = args.retro_chunk_length, args.retro_num_neighbors
  n = args.seq_length
  tokens = rng.integers(0, args.padded_vocab_size, (2, n))
  neighbors = rng.integers(0, args.padded_vocab_size, (2, n // m, k, 2 * m))
  return tokens, neighbors


def _converted(variant, tp, tmp_path):
  args, model = _model(variant)
  args = argparse.Namespace(**{**vars(args), "tensor_model_parallel_size": tp})
  ckpt = tmp_path / "megatron"
  megatron_ref.save_legacy(model, args, str(ckpt), tp)
  convert.convert(str(ckpt), str(tmp_path / "workdir"))
  return checkpoints.load_model(str(tmp_path / "workdir"))


def _ours(loaded, tokens, neighbors, cca_scale=None):
  cfg = loaded.config if cca_scale is None else loaded.config.replace(cca_scale=cca_scale)
  out = model_lib.Retro(cfg).apply({"params": loaded.params}, jnp.asarray(tokens),
                                   None if neighbors is None else jnp.asarray(neighbors))
  return np.asarray(out, np.float32)


@pytest.mark.parametrize("variant,tp", [("release", 2), ("release", 4), ("other", 2)])
def test_logits_match_megatron_core(variant, tp, tmp_path):
  args, model = _model(variant)
  loaded = _converted(variant, tp, tmp_path)
  assert loaded.config.cca_layers == legacy.arch_from_args(args, "args", 1).cca_layers
  tokens, neighbors = _inputs(args)
  diffs = {}
  for gate in (1.0, 0.0):
    ref = megatron_ref.logits(model, tokens, neighbors, gate)
    ours = _ours(loaded, tokens, neighbors, cca_scale=gate)
    diffs[gate] = float(np.abs(ours - ref).max())
  print(f"\nparity {variant} TP={tp}: max |logit diff| gate 1 {diffs[1.0]:.2e}, "
        f"gate 0 {diffs[0.0]:.2e}")
  assert diffs[1.0] <= TOL and diffs[0.0] <= TOL, diffs
  # The comparison bites: neighbors change the logits at gate 1 (both sides), not at gate 0.
  other_neighbors = _inputs(args, seed=1)[1]
  moved = megatron_ref.logits(model, tokens, other_neighbors, 1.0)
  ref = megatron_ref.logits(model, tokens, neighbors, 1.0)
  effect = float(np.abs(moved - ref).max())
  print(f"  neighbors move the logits by {effect:.2e}")
  assert effect > 100 * max(diffs.values())
  np.testing.assert_allclose(_ours(loaded, tokens, other_neighbors, 1.0), moved, atol=TOL,
                             rtol=0)
  np.testing.assert_array_equal(_ours(loaded, tokens, other_neighbors, 0.0),
                                _ours(loaded, tokens, neighbors, 0.0))


def test_presets_match_the_released_architectures():
  """nvidia-retro-8b / -48b have the parameter count of the architecture of the released
  checkpoints' args (tensor shapes as legacy.expected_shapes derives them)."""
  def release_args(**kw):
    return argparse.Namespace(**{**dict(
        num_layers=32, hidden_size=4096, ffn_hidden_size=10880, num_attention_heads=32,
        position_embedding_type="rope", rotary_percent=0.5, normalization="LayerNorm",
        apply_layernorm_1p=True, swiglu=True, add_bias_linear=False,
        untie_embeddings_and_output_weights=True, padded_vocab_size=256000,
        max_position_embeddings=4096, retro_add_retriever=True, retro_num_neighbors=2,
        retro_num_retrieved_chunks=2, retro_encoder_layers=2), **kw})
  counts = {}
  for name, args, tp in (
      ("nvidia-retro-8b", release_args(tensor_model_parallel_size=4), 4),
      ("nvidia-retro-48b", release_args(num_layers=48, hidden_size=8192, ffn_hidden_size=21824,
                                        num_attention_heads=64, tensor_model_parallel_size=8), 8)):
    arch = legacy.arch_from_args(args, name, tp, chunk_size=64)
    expected = sum(int(np.prod(s)) for s in legacy.expected_shapes(arch).values())
    preset = config_lib.get_preset(name)
    assert preset == convert.retro_config(arch, cca_scale=1.0)
    counts[name] = model_lib.count_params(preset, embeddings=True)
    assert counts[name] == expected, (name, counts[name], expected)
  print(f"\nparams: {counts}")
  # What NVIDIA's names say: ~9.5B (an 8B GPT + retrieval) and ~48B.
  assert 9.4e9 < counts["nvidia-retro-8b"] < 9.6e9
  assert 48.0e9 < counts["nvidia-retro-48b"] < 49.0e9
