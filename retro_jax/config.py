"""Model configuration: one frozen dataclass, validated on construction, and named presets.

Layer indices are 1-based, as in the paper ("CCA every 3rd layer from layer 6" means
layers 6, 9, 12, ...).  A baseline (no retrieval) is a config with `cca_layers=()`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


class ConfigError(ValueError):
  """An invalid model configuration; the message names the offending field."""


def every_third_from(start: int, num_layers: int, every: int = 3) -> tuple[int, ...]:
  """1-based layer indices start, start+every, ... up to num_layers (paper §2.5)."""
  return tuple(range(start, num_layers + 1, every))


_DTYPES = ("float32", "bfloat16", "float16")
POSITIONALS = ("xl", "rope", "learned_absolute")
NORMS = ("rmsnorm", "layernorm")
MLPS = ("gelu", "swiglu", "squared_relu")
BIASES = ("none", "qkv", "all")
ATTENTION_IMPLS = ("einsum", "sdpa_xla", "sdpa_cudnn", "auto")
# jax.checkpoint_policies names offered for remat.
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")


@dataclasses.dataclass(frozen=True)
class RetroConfig:
  """Everything that fixes the shapes and the computation of a RETRO model."""

  # --- Vocabulary and retrieval geometry -------------------------------------------------
  vocab_size: int = 128_000            # LM vocabulary (paper: SentencePiece 128k).
  chunk_size: int = 64                 # m: tokens per chunk; retrieval happens every m tokens.
  num_neighbors: int = 2               # k: neighbors per chunk the model is trained with.
  # Neighbor length r = 2m (retrieved chunk N plus its continuation F); derived, not a field.

  # --- Decoder ------------------------------------------------------------------------------
  emb_dim: int = 896                   # d: decoder width.
  num_layers: int = 12                 # decoder depth.
  num_heads: int = 16                  # decoder attention heads (self-attention and CCA).
  head_dim: int = 64                   # width of one head.
  mlp_dim: int = 3584                  # d_ffw of the decoder feed-forward blocks.
  cca_layers: tuple[int, ...] = (6, 9, 12)  # 1-based decoder layers with chunked cross-attn.

  # --- Neighbor encoder (ignored when cca_layers is empty) ---------------------------------
  enc_emb_dim: int = 896               # d': encoder width (896 for every paper size).
  enc_num_layers: int = 2
  enc_num_heads: int = 16
  enc_head_dim: int = 64
  enc_mlp_dim: int = 3584
  # 1-based encoder layers that cross-attend to the decoder activations H_u of the chunk.
  enc_cross_attention_layers: tuple[int, ...] = (1,)
  share_embeddings: bool = False       # encoder reuses the decoder token embedding (needs d'=d).

  # --- Learning to read neighbors (not in the paper; all off in the paper presets) ----------
  # See README "Learning to read neighbors" for the ablation of each.
  # CCA adds a learned per-head logit to every token of the neighbor of rank i (0 = nearest;
  # ranks past the training k share the last one): a prior on which neighbor to read.
  cca_rank_bias: bool = False
  # Each CCA update passes through tanh(g), g a learned scalar starting at 0 (Flamingo): the
  # decoder starts as the baseline and lets neighbors in as far as they help.
  cca_gate: bool = False
  # Shift each neighbor's 2m-token window inside its document so that its longest token run
  # shared with the retrieving chunk lines up with the chunk (retrieval/store/align.py): a copy
  # is then one fixed relative distance away.  Applied in training, evaluation, generation.
  align_neighbors: bool = False
  # Drop neighbors whose longest token run shared with the retrieving chunk is shorter than
  # this (0 = keep all): chunks without lexical overlap get no CCA update.
  neighbor_min_match: int = 0
  # A pointer over the neighbor tokens mixed into the output distribution with a learned
  # gate (model/copy.py): a neighbor token's identity reaches the output without having to
  # be learned through encoder, CCA and unembedding.
  copy_head: bool = False

  # --- Decoder family (defaults: the paper's decoder; see tests/test_families.py) -----------
  # Positions of the decoder self-attention: "xl" (Transformer-XL relative, the paper),
  # "rope" (rotary, Llama's rotate-half layout) or "learned_absolute" (GPT-2's table added
  # to the token embedding).  The encoder and CCA keep their relative positions.
  positional: str = "xl"
  rope_base: float = 10_000.0          # rope: wavelength base (Llama 1e4, SmolLM2 1e5).
  # rope: fraction of each head's dimensions rotated (the first ones; Megatron's
  # rotary_percent, HF's partial_rotary_factor); the rest pass unchanged.
  rope_fraction: float = 1.0
  max_len: int = 2048                  # learned_absolute: positions in the table.
  norm: str = "rmsnorm"                # "rmsnorm" | "layernorm" (every norm of the model).
  # Norm weights stored as w - 1 and applied as 1 + w (Megatron's layernorm-1p): weight
  # decay pulls them to 1, not 0.
  norm_zero_centered: bool = False
  mlp: str = "gelu"                    # "gelu" (tanh approx.) | "swiglu" | "squared_relu".
  num_kv_heads: int = 0                # grouped-query attention: key/value heads (0 = num_heads).
  tie_embeddings: bool = False         # the unembedding is the token embedding transposed.
  # Linear biases: "none" (paper, Llama), "qkv" (query/key/value only, Qwen2), "all" (also
  # the attention output and MLP: GPT-2, Megatron).  Not with positional "xl".
  bias: str = "none"

  # --- Numerics and memory -------------------------------------------------------------------
  norm_eps: float = 1e-6               # norm epsilon.
  dtype: str = "float32"               # compute dtype; parameters are always float32.
  remat: bool = False                  # rematerialise each block in the backward pass.
  init_std: float = 0.02               # stddev of the truncated-normal weight init.
  # Sinusoid wavelength base of the relative-position features.
  pos_max_wavelength: float = 10_000.0

  # --- Accelerator speed (same model, same parameters; see model/attention.py) ---------------
  # Attention core: "einsum" (reference), "sdpa_xla" / "sdpa_cudnn" (jax.nn.dot_product_attention
  # with the relative-position term as its bias; cuDNN needs a GPU and bfloat16/float16), or
  # "auto": sdpa_cudnn on a GPU in half precision, else einsum.
  attention_impl: str = "einsum"
  # In bfloat16/float16, the dots with float32 outputs (unembedding, einsum attention logits)
  # take their cotangent in the compute dtype, so their backward matmuls run in it too.
  low_precision_grads: bool = True
  # Decoder layers as nn.scan over groups of identical blocks (model/retro.py): one compiled
  # body per group.  Parameters are then stacked per group (model/params.py converts).
  scan_layers: bool = False
  # What remat (or scanned layers with remat) saves: a jax.checkpoint_policies name.
  remat_policy: str = "nothing_saveable"

  def __post_init__(self):
    def positive(name):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")

    for name in ("vocab_size", "chunk_size", "num_neighbors", "emb_dim", "num_layers",
                 "num_heads", "head_dim", "mlp_dim", "enc_emb_dim", "enc_num_layers",
                 "enc_num_heads", "enc_head_dim", "enc_mlp_dim"):
      positive(name)
    # Normalise list-valued fields (ml_collections and JSON give lists) to tuples.
    for name in ("cca_layers", "enc_cross_attention_layers"):
      value = getattr(self, name)
      if value is None:
        value = ()
      try:
        value = tuple(int(v) for v in value)
      except (TypeError, ValueError) as e:
        raise ConfigError(f"{name} must be a sequence of layer indices, got {value!r}") from e
      object.__setattr__(self, name, value)
    if list(self.cca_layers) != sorted(set(self.cca_layers)):
      raise ConfigError(f"cca_layers must be strictly increasing, got {self.cca_layers}")
    bad = [i for i in self.cca_layers if not 1 <= i <= self.num_layers]
    if bad:
      raise ConfigError(
          f"cca_layers {bad} lie outside the decoder's layers 1..{self.num_layers} "
          f"(layer indices are 1-based)")
    bad = [i for i in self.enc_cross_attention_layers if not 1 <= i <= self.enc_num_layers]
    if bad:
      raise ConfigError(
          f"enc_cross_attention_layers {bad} lie outside the encoder's layers "
          f"1..{self.enc_num_layers}")
    if self.uses_retrieval and not self.enc_cross_attention_layers:
      raise ConfigError("enc_cross_attention_layers is empty: the encoder must be conditioned "
                        "on the decoder activations of the retrieving chunk (paper §2.4)")
    if self.share_embeddings and self.uses_retrieval and self.enc_emb_dim != self.emb_dim:
      raise ConfigError(
          f"share_embeddings needs enc_emb_dim == emb_dim, got {self.enc_emb_dim} != "
          f"{self.emb_dim}")
    if (not isinstance(self.neighbor_min_match, int) or isinstance(self.neighbor_min_match, bool)
        or not 0 <= self.neighbor_min_match <= self.chunk_size):
      raise ConfigError(f"neighbor_min_match must be an integer in [0, chunk_size="
                        f"{self.chunk_size}], got {self.neighbor_min_match!r}")
    for name in ("cca_rank_bias", "cca_gate", "align_neighbors", "copy_head",
                 "share_embeddings", "remat"):
      if not isinstance(getattr(self, name), bool):
        raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ConfigError(f"attention_impl must be one of {ATTENTION_IMPLS}, got "
                        f"{self.attention_impl!r}")
    if self.attention_impl == "sdpa_cudnn" and self.dtype == "float32":
      raise ConfigError("attention_impl='sdpa_cudnn' needs dtype bfloat16 or float16 "
                        "(cuDNN attention has no float32 kernel); use 'sdpa_xla'")
    if self.remat_policy not in REMAT_POLICIES:
      raise ConfigError(f"remat_policy must be one of {REMAT_POLICIES}, got "
                        f"{self.remat_policy!r}")
    for name in ("low_precision_grads", "scan_layers"):
      if not isinstance(getattr(self, name), bool):
        raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
    steps = {b - a for a, b in zip(self.cca_layers, self.cca_layers[1:])}
    if self.scan_layers and len(steps) > 1:
      raise ConfigError(f"scan_layers needs evenly spaced cca_layers (one scanned period), "
                        f"got {self.cca_layers}")
    self._check_family()
    if self.dtype not in _DTYPES:
      raise ConfigError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
    if not self.norm_eps > 0:
      raise ConfigError(f"norm_eps must be > 0, got {self.norm_eps}")
    if self.pos_max_wavelength <= 1:
      raise ConfigError(f"pos_max_wavelength must be > 1, got {self.pos_max_wavelength}")
    for name in ("emb_dim", "enc_emb_dim"):
      if getattr(self, name) % 2:
        raise ConfigError(f"{name} must be even (sinusoidal position features), got "
                          f"{getattr(self, name)}")

  def _check_family(self):
    def one_of(name, values):
      if getattr(self, name) not in values:
        raise ConfigError(f"{name} must be one of {values}, got {getattr(self, name)!r}")

    one_of("positional", POSITIONALS)
    one_of("norm", NORMS)
    one_of("mlp", MLPS)
    one_of("bias", BIASES)
    for name in ("norm_zero_centered", "tie_embeddings"):
      if not isinstance(getattr(self, name), bool):
        raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
    if not self.rope_base > 1:
      raise ConfigError(f"rope_base must be > 1, got {self.rope_base}")
    if not 0 < self.rope_fraction <= 1:
      raise ConfigError(f"rope_fraction must be in (0, 1], got {self.rope_fraction}")
    if self.positional == "rope" and (self.rotary_dim < 2 or self.rotary_dim % 2):
      raise ConfigError(f"rope rotates int(head_dim * rope_fraction) = {self.rotary_dim} "
                        f"dimensions per head: it must be even and >= 2")
    if not isinstance(self.max_len, int) or isinstance(self.max_len, bool) or self.max_len < 1:
      raise ConfigError(f"max_len must be a positive integer, got {self.max_len!r}")
    kv = self.num_kv_heads
    if not isinstance(kv, int) or isinstance(kv, bool) or kv < 0:
      raise ConfigError(f"num_kv_heads must be an integer >= 0 (0 = num_heads), got {kv!r}")
    if self.num_heads % self.kv_heads:
      raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads="
                        f"{self.kv_heads}")
    if self.positional == "xl" and (self.kv_heads != self.num_heads or self.bias != "none"):
      raise ConfigError("positional='xl' supports neither num_kv_heads < num_heads nor "
                        "linear biases; use positional='rope' or 'learned_absolute'")

  # --- Derived quantities --------------------------------------------------------------------
  @property
  def kv_heads(self) -> int:
    """Key/value heads of the decoder self-attention."""
    return self.num_kv_heads or self.num_heads

  @property
  def rotary_dim(self) -> int:
    """rope: dimensions of each head that are rotated."""
    return int(self.head_dim * self.rope_fraction)

  @property
  def uses_retrieval(self) -> bool:
    return bool(self.cca_layers)

  @property
  def neighbor_len(self) -> int:
    """r: tokens per neighbor, the chunk plus its continuation."""
    return 2 * self.chunk_size

  def num_chunks(self, seq_len: int) -> int:
    """l = ceil(n / m): chunks covering a sequence of n tokens."""
    return -(-seq_len // self.chunk_size)

  def replace(self, **changes: Any) -> "RetroConfig":
    return dataclasses.replace(self, **changes)

  def baseline(self) -> "RetroConfig":
    """The same decoder without retrieval."""
    return self.replace(cca_layers=())

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    # Fields added after checkpoints existed are written only when set, so that a saved
    # config from before them still equals today's default (resume compares the dicts).
    for name, default in _LATER_FIELDS.items():
      if d[name] == default:
        del d[name]
    d["cca_layers"] = list(self.cca_layers)
    d["enc_cross_attention_layers"] = list(self.enc_cross_attention_layers)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "RetroConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ConfigError(f"unknown RetroConfig fields: {unknown}")
    return cls(**dict(d))


_LATER_FIELDS = dict(attention_impl="einsum", low_precision_grads=True, scan_layers=False,
                     remat_policy="nothing_saveable", rope_base=10_000.0, rope_fraction=1.0,
                     max_len=2048, norm="rmsnorm", norm_zero_centered=False, mlp="gelu",
                     num_kv_heads=0, tie_embeddings=False, bias="none")


# --- Presets ------------------------------------------------------------------------------

def _paper(d, ffw, heads, head_dim, layers):
  return dict(emb_dim=d, mlp_dim=ffw, num_heads=heads, head_dim=head_dim, num_layers=layers,
              cca_layers=every_third_from(6, layers))


_PAPER = {
    # name: (retro preset, baseline preset) — paper Table 2.
    "172m": _paper(896, 3584, 16, 64, 12),
    "425m": _paper(1536, 6144, 12, 128, 12),
    "1.5b": _paper(2048, 8192, 16, 128, 24),
    "7.5b": _paper(4096, 16384, 32, 128, 32),
}
_BASELINE_NAMES = {"172m": "132m", "425m": "368m", "1.5b": "1.3b", "7.5b": "7b"}

PRESETS: dict[str, dict[str, Any]] = {}
for _size, _fields in _PAPER.items():
  PRESETS[f"retro-{_size}"] = dict(_fields)
  PRESETS[f"baseline-{_BASELINE_NAMES[_size]}"] = dict(_fields, cca_layers=())

# Small presets for CPU work.  `tiny` is the test preset: 2 chunks of 8 tokens per
# 16-token sequence, CCA at both a middle and the last layer.
_TINY = dict(vocab_size=128, chunk_size=8, num_neighbors=2, emb_dim=32, num_layers=4,
             num_heads=4, head_dim=8, mlp_dim=64, cca_layers=(2, 4), enc_emb_dim=24,
             enc_num_layers=2, enc_num_heads=2, enc_head_dim=12, enc_mlp_dim=48)
PRESETS["tiny"] = _TINY
PRESETS["tiny-baseline"] = dict(_TINY, cca_layers=())
# `tiny` with a Llama-family decoder (rotary positions, SwiGLU, grouped-query attention with
# 2 key/value heads, tied embeddings): the property tests run on both families.
PRESETS["tiny-llama"] = dict(_TINY, positional="rope", mlp="swiglu", num_kv_heads=2,
                             tie_embeddings=True, norm_eps=1e-5)
# ~10M non-embedding parameters: the quickstart's model, trainable in minutes on 2 cores.
_SMALL = dict(vocab_size=4096, chunk_size=32, num_neighbors=2, emb_dim=256, num_layers=6,
              num_heads=4, head_dim=64, mlp_dim=1024, cca_layers=(3, 6), enc_emb_dim=256,
              enc_num_layers=2, enc_num_heads=4, enc_head_dim=64, enc_mlp_dim=1024)
PRESETS["small"] = _SMALL
PRESETS["small-baseline"] = dict(_SMALL, cca_layers=())
# The quickstart's model: the `small` decoder with a narrower neighbor encoder (the encoder
# reads k*r/m = 4 neighbor tokens per decoder token, so its width sets RETRO's cost over
# the baseline; measured in experiments/benchmarks/README.md, "Where the code's defaults
# come from").
# "quickstart-paper" reads its neighbors as the paper does; "quickstart" adds the options
# that make reading learnable in a CPU-sized run (README "Learning to read neighbors"):
# aligned neighbors, the min-match filter (m/4 tokens), the copy head and the CCA gate.
PRESETS["quickstart-paper"] = dict(_SMALL, enc_emb_dim=128, enc_num_heads=4, enc_head_dim=32,
                                   enc_mlp_dim=512)
PRESETS["quickstart"] = dict(PRESETS["quickstart-paper"], align_neighbors=True,
                             neighbor_min_match=8, copy_head=True, cca_gate=True)
PRESETS["quickstart-baseline"] = dict(PRESETS["quickstart-paper"], cca_layers=())
# (The benchmarks' peer-38m presets are registered by experiments/benchmarks/common.py.)


def get_preset(name: str, **overrides: Any) -> RetroConfig:
  """A named preset (see PRESETS), optionally with fields overridden."""
  if name not in PRESETS:
    raise ConfigError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
  return RetroConfig(**{**PRESETS[name], **overrides})
