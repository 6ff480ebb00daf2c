"""Sharding over 8 simulated CPU devices: golden partition specs, sharded == single device.

The device count is fixed when JAX initialises, so the check runs in a fresh interpreter.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import jax

from retro_jax import config as config_lib
from retro_jax.model import sharding

# Expected mesh partition specs of the tiny preset's parameters (rules table in sharding.py).
ATTN = {"wq": ["fsdp", "tensor", None], "wk": ["fsdp", "tensor", None],
        "wv": ["fsdp", "tensor", None], "wr": ["fsdp", "tensor", None],
        "wo": ["tensor", None, "fsdp"], "content_bias": ["tensor", None],
        "position_bias": ["tensor", None]}
NORM = {"scale": [None]}
FFW = {"wi": ["fsdp", "tensor"], "wo": ["tensor", "fsdp"]}


def _decoder_layer(cca):
  layer = {"attn_norm": NORM, "attn": ATTN, "ffw_norm": NORM, "ffw": FFW}
  if cca:
    layer.update(cca_norm=NORM, cca={"attn": ATTN})
  return layer


GOLDEN_TINY = {
    "embed": {"embedding": ["tensor", "fsdp"]},
    "unembed": ["fsdp", "tensor"],
    "final_norm": NORM,
    **{f"layer_{i}": _decoder_layer(i + 1 in (2, 4)) for i in range(4)},
    "encoder": {
        "embed": {"embedding": ["tensor", "fsdp"]},
        "final_norm": NORM,
        "layer_0": {"self_norm": NORM, "self_attn": ATTN, "cross_norm": NORM,
                    "context_norm": NORM, "cross_attn": ATTN, "ffw_norm": NORM, "ffw": FFW},
        "layer_1": {"self_norm": NORM, "self_attn": ATTN, "ffw_norm": NORM, "ffw": FFW},
    },
}


def _as_lists(tree):
  if isinstance(tree, dict):
    return {k: _as_lists(v) for k, v in tree.items()}
  return [None if a is None else a for a in tuple(tree)]


def test_golden_partition_specs_of_tiny_preset():
  specs = sharding.param_partition_specs(config_lib.get_preset("tiny"))
  assert _as_lists(specs) == GOLDEN_TINY


SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import flax.linen as nn
    from retro_jax import config as config_lib
    from retro_jax.model import Retro, init_params, sharding
    assert len(jax.devices()) == 8, jax.devices()
    cfg = config_lib.get_preset(sys.argv[1])
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    key = jax.random.PRNGKey(0)
    sharded = sharding.init_sharded_params(cfg, key, mesh)
    single = init_params(cfg, key)
    out = {}
    # Created directly sharded: every shard is smaller than the whole where the spec splits.
    emb = sharded["embed"]["embedding"]
    out["embed_shard_shape"] = list(emb.addressable_shards[0].data.shape)
    out["embed_shape"] = list(emb.shape)
    # Same random streams sharded or not (threefry is partitionable); values may differ
    # in the last ulp where XLA fuses the sharded init differently.
    out["params_equal"] = all(
        bool(np.allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7))
        for a, b in zip(jax.tree_util.tree_leaves(sharded), jax.tree_util.tree_leaves(single)))
    rng = np.random.default_rng(0)
    n = 3 * cfg.chunk_size
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (4, n)), jnp.int32)
    nb = jnp.asarray(rng.integers(-1, cfg.vocab_size, (4, 3, 2, 2 * cfg.chunk_size)), jnp.int32)
    model = Retro(cfg)
    fwd = lambda p, t, b: model.apply({"params": p}, t, b)
    ref = jax.jit(fwd)(single, tokens, nb)
    with nn.logical_axis_rules(sharding.LOGICAL_RULES), jax.set_mesh(mesh):
      got = jax.jit(fwd, in_shardings=(None, sharding.batch_sharding(mesh, 2),
                                       sharding.batch_sharding(mesh, 4)))(sharded, tokens, nb)
    out["max_diff"] = float(jnp.abs(got - ref).max())
    out["out_sharding"] = str(got.sharding.spec)
    out["logits_shard_shape"] = list(got.addressable_shards[0].data.shape)
    out["logits_shape"] = list(got.shape)
    try:
      sharding.init_sharded_params(cfg.replace(vocab_size=97), key, mesh)
      out["uneven_error"] = None
    except ValueError as e:
      out["uneven_error"] = str(e)
    # The train state (params + optimizer state) goes through the same checked path.
    import optax
    from retro_jax.training import trainer
    try:
      trainer.make_init(cfg.replace(vocab_size=97), optax.adamw(1e-3), mesh)
      out["uneven_state_error"] = None
    except ValueError as e:
      out["uneven_state_error"] = str(e)
    print("RESULT" + json.dumps(out))
""")


# tiny-llama: the Llama-family decoder (rope, SwiGLU, grouped-query heads, tied embeddings).
@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_sharded_forward_equals_single_device(preset):
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
             + " --xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT, preset], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][0]
  out = json.loads(line[len("RESULT"):])
  assert out["params_equal"]
  # embedding [vocab, embed] split over tensor x fsdp = 2 x 2.
  assert out["embed_shard_shape"] == [out["embed_shape"][0] // 2, out["embed_shape"][1] // 2]
  assert out["max_diff"] < 1e-5, out
  # Logits [B, n, V] come back split by the rules table: batch over data x fsdp, vocab
  # over tensor (logical names batch, length, act_vocab).
  assert out["out_sharding"] == str(jax.sharding.PartitionSpec(("data", "fsdp"), None,
                                                               "tensor")), out
  b, n, v = out["logits_shape"]
  assert out["logits_shard_shape"] == [b // 4, n, v // 2]
  assert "dimension 97 cannot be split 2 ways" in out["uneven_error"]
  assert "dimension 97 cannot be split 2 ways" in out["uneven_state_error"]
