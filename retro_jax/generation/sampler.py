"""Autoregressive sampling with a KV cache and live retrieval every completed chunk.

    gen = Generator(params, config, tokenizer, retriever=Retriever.open(DB), num_neighbors=2)
    outs = gen.generate(["def main():", "import os"], SamplingParams(max_new_tokens=64))
    outs[0].text

Loop, per group of prompts (below):
  prompt -> tokens [B, p] -> `Retro.prefill` (the full forward pass, filling the cache);
  neighbors for the prompt's complete chunks are retrieved first, with each chunk's tokens;
  then for every new token: sample from the last logits, feed it with `Retro.decode_step`
  at position pos; when that token completes chunk u (pos = (u+1)m - 1), its m tokens are
  sent to the retriever (`retrieve_chunks`, in-process `Retriever` or `RemoteRetriever`)
  and the k neighbors [B, k, r] go into that same decode_step, which encodes them once
  (conditioned on the chunk's activations) for the next m tokens' CCA.
The model code is the one `Retro` definition; prefill/decode_step are its methods.

Prompts of different lengths: a batch shares one position counter, and chunk boundaries
are positions, so prompts are grouped by token length and each group is one batch (a
batch of equal-length prompts runs as one; a mix runs as several smaller batches).  Left
padding would shift chunk boundaries and the relative positions; right padding would make
rows finish prompts at different steps.  Both give wrong neighbors or wrong attention.

Randomness: token t of prompt i is drawn with fold_in(fold_in(PRNGKey(seed), i), t), so a
prompt's sample does not depend on which other prompts share its batch.  temperature 0 is
greedy; top_k 0 and top_p 1.0 disable those filters.

Stopping: after max_new_tokens, or when every row of the group produced eos (a row that
produced eos keeps being fed but its text ends at the eos).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax import fileio
from retro_jax import provenance
from retro_jax.config import RetroConfig
from retro_jax.generation import generate_config
from retro_jax.inference import checkpoints as ckpt_lib
from retro_jax.inference import session as session_lib
from retro_jax.model import Retro
from retro_jax.retrieval.store import align as align_lib


# The job's configuration lives in generate_config.py; these names stay importable here.
GenerateConfig = generate_config.GenerateConfig
GenerationError = generate_config.GenerationError
SamplingParams = generate_config.SamplingParams


@dataclasses.dataclass
class Generation:
  prompt_tokens: list[int]
  tokens: list[int]                 # generated tokens, eos excluded
  text: str                         # decoded generated tokens
  stop_reason: str                  # "eos" or "length"
  neighbor_ids: np.ndarray          # [chunks retrieved, k] database chunk ids, -1 = none
  neighbor_tokens: np.ndarray       # [chunks retrieved, k, r]
  logits: np.ndarray | None = None  # [positions fed, V] when asked for
  full_text: str = ""               # prompt + generation decoded together (joins words right)


# --- jitted pieces (module level, config static: one compile per shape) -------------------

@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _init_cache(cfg: RetroConfig, batch: int, max_len: int, k: int | None, params):
  return Retro(cfg).apply({"params": params}, batch, max_len, k, method=Retro.init_cache)


@functools.partial(jax.jit, static_argnums=0)
def _prefill(cfg: RetroConfig, params, tokens, neighbors, cache):
  return Retro(cfg).apply({"params": params}, tokens, neighbors, cache, method=Retro.prefill)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _decode(cfg: RetroConfig, params, cache, token, pos, neighbors):
  return Retro(cfg).apply({"params": params}, token, cache, pos, neighbors,
                          method=Retro.decode_step)


def filter_logits(logits, temperature, top_k, top_p):
  """Temperature, then top-k and nucleus (top-p) filtering: logits [B, V] -> [B, V]."""
  logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
  v = logits.shape[-1]
  desc = -jnp.sort(-logits, axis=-1)  # [B, V] descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  kth = jnp.take_along_axis(desc, jnp.full(logits.shape[:-1] + (1,), k - 1), axis=-1)
  probs = jax.nn.softmax(desc, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each sorted token
  keep_sorted = (before < top_p) | (jnp.arange(v) == 0)
  pth = jnp.min(jnp.where(keep_sorted, desc, jnp.inf), axis=-1, keepdims=True)
  cut = jnp.maximum(kth, pth)
  return jnp.where(logits >= cut, logits, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("greedy",))
def sample_tokens(logits, keys, temperature, top_k, top_p, greedy: bool):
  """One token per row: logits [B, V], keys [B, 2] -> int32 [B]."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits, temperature, top_k, top_p)
  return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)


# --- the generator ------------------------------------------------------------------------

class Generator:
  """Samples from a RETRO (or baseline) model, retrieving live every completed chunk.

  Args:
    params, config: the model (see inference.checkpoints.load_model).
    tokenizer: the LM tokenizer (encode/decode, eos_id).
    retriever: object with `retrieve_chunks(tokens [Q, m], k)` (Retriever or
      RemoteRetriever); None runs a RETRO model without retrieval.
    num_neighbors: k per chunk (default: the model's training k).
    cache_bucket: cache lengths are rounded up to a multiple of this (fewer compiles).
  """

  def __init__(self, params, config: RetroConfig, tokenizer, retriever=None,
               num_neighbors: int | None = None, cache_bucket: int = 64):
    self.params = params
    self.config = config
    self.tokenizer = tokenizer
    self.retriever = retriever if config.uses_retrieval else None
    self.k = int(num_neighbors or config.num_neighbors)
    if self.k < 1:
      raise GenerationError(f"num_neighbors must be >= 1, got {num_neighbors}")
    self.cache_bucket = max(1, int(cache_bucket))

  def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
    if isinstance(prompts, str):
      prompts = [prompts]
    if not prompts:
      raise GenerationError("no prompt given")
    out = []
    for i, p in enumerate(prompts):
      ids = self.tokenizer.encode(p) if p and p.strip() else []
      if not ids:
        raise GenerationError(f"prompt {i} is empty ({p!r}): give at least one token of text")
      out.append(list(ids))
    return out

  def generate(self, prompts: Sequence[str], sampling: SamplingParams = SamplingParams(),
               return_logits: bool = False) -> list[Generation]:
    """Texts in, one Generation per prompt (same order)."""
    return self.generate_tokens(self.encode_prompts(prompts), sampling, return_logits)

  def generate_tokens(self, prompts: Sequence[Sequence[int]],
                      sampling: SamplingParams = SamplingParams(),
                      return_logits: bool = False) -> list[Generation]:
    sampling.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
      raise GenerationError("every prompt needs at least one token")
    vocab = self.config.vocab_size
    for i, p in enumerate(prompts):
      if min(p) < 0 or max(p) >= vocab:
        raise GenerationError(f"prompt {i} has token ids outside [0, {vocab})")
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
      groups.setdefault(len(p), []).append(i)
    out: list[Generation | None] = [None] * len(prompts)
    for _, idx in sorted(groups.items()):
      tokens = np.asarray([prompts[i] for i in idx], np.int32)
      for i, g in zip(idx, self._generate_group(tokens, idx, sampling, return_logits)):
        out[i] = g
    return out  # type: ignore[return-value]

  def retrieve(self, chunks: np.ndarray):
    """The neighbors the model reads for complete chunks [Q, m] of its input: ids [Q, k],
    tokens [Q, k, r], presented as it was trained (aligned / filtered, or the paper's)."""
    return self._retrieve(chunks)

  # --- internals ----------------------------------------------------------------------
  def _retrieve(self, chunks: np.ndarray):
    """chunks [Q, m] -> ids [Q, k], tokens [Q, k, r]; neighbor ids outside the model's
    vocabulary (a damaged database) are refused, naming where they came from."""
    ids, toks = self._retrieve_unchecked(chunks)
    if toks.size and (toks.min() < -1 or toks.max() >= self.config.vocab_size):
      try:
        source = session_lib.retriever_name(self.retriever)
      except AttributeError:
        source = type(self.retriever).__name__
      fileio.check_token_ids(toks, self.config.vocab_size, f"the neighbor tokens from {source}",
                             "its chunk store is damaged: rebuild the database with "
                             "python -m retro_jax.build_db", GenerationError)
    return ids, toks

  def _retrieve_unchecked(self, chunks: np.ndarray):
    shown = align_lib.Presentation.of(self.config)
    if shown.is_paper:
      res = self.retriever.retrieve_chunks(np.asarray(chunks, np.int32), self.k)
      return np.asarray(res.ids, np.int64), np.asarray(res.tokens, np.int32)
    store = getattr(self.retriever, "store", None)
    if store is None:
      raise GenerationError("this model was trained with aligned/filtered neighbors "
                            "(align_neighbors, neighbor_min_match), which reads the "
                            "database's tokens: use an in-process retriever (--db_dir)")
    k = self.k if not shown.min_match else max(self.k, align_lib.CANDIDATES)
    res = self.retriever.retrieve_chunks(np.asarray(chunks, np.int32), k)
    ids, toks = align_lib.present(store, res.ids, np.asarray(chunks), shown, self.k)
    return np.asarray(ids, np.int64), np.asarray(toks, np.int32)

  def _generate_group(self, prompt: np.ndarray, prompt_ids: Sequence[int],
                      sampling: SamplingParams, return_logits: bool) -> list[Generation]:
    cfg, m, r = self.config, self.config.chunk_size, self.config.neighbor_len
    b, p = prompt.shape
    steps = sampling.max_new_tokens
    max_len = -(-(p + steps) // self.cache_bucket) * self.cache_bucket
    retrieve = self.retriever is not None
    k = self.k if cfg.uses_retrieval else None
    cache = _init_cache(cfg, b, max_len, k, self.params)

    nb_ids = [[] for _ in range(b)]
    nb_toks = [[] for _ in range(b)]
    prompt_nb = None
    if retrieve:
      # [B, ceil(p/m), k, r]: complete chunks get their neighbors, a partial one -1 (it
      # reaches no position yet; decode_step gets its neighbors when it completes).
      prompt_nb = np.full((b, cfg.num_chunks(p), self.k, r), -1, np.int32)
      full = p // m
      if full:
        ids, toks = self._retrieve(prompt[:, :full * m].reshape(b * full, m))
        prompt_nb[:, :full] = toks.reshape(b, full, self.k, r)
        for i in range(b):
          nb_ids[i] += list(ids.reshape(b, full, self.k)[i])
          nb_toks[i] += list(toks.reshape(b, full, self.k, r)[i])
    logits, cache = _prefill(cfg, self.params, jnp.asarray(prompt), prompt_nb, cache)
    kept = [np.asarray(logits)] if return_logits else None
    last = logits[:, -1]

    seq = np.zeros((b, p + steps), np.int32)
    seq[:, :p] = prompt
    base = jax.random.PRNGKey(sampling.seed)
    row_keys = jnp.stack([jax.random.fold_in(base, int(i)) for i in prompt_ids])
    greedy = sampling.temperature == 0
    eos = self.tokenizer.eos_id if sampling.stop_at_eos else None
    done = np.zeros(b, bool)
    ends = np.full(b, steps)
    produced = 0
    for t in range(steps):
      keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, t)
      nxt = np.asarray(sample_tokens(last, keys, sampling.temperature, sampling.top_k,
                                     sampling.top_p, greedy=greedy))
      pos = p + t
      seq[:, pos] = nxt
      produced = t + 1
      if eos is not None:
        newly = (~done) & (nxt == eos)
        ends[newly] = t
        done |= newly
        if done.all():
          break
      if t == steps - 1:
        break  # the last sampled token need not be fed
      nb = None
      if retrieve and (pos + 1) % m == 0:
        ids, toks = self._retrieve(seq[:, pos + 1 - m:pos + 1])
        nb = jnp.asarray(toks)
        for i in range(b):
          nb_ids[i].append(ids[i])
          nb_toks[i].append(toks[i])
      logits, cache = _decode(cfg, self.params, cache, jnp.asarray(nxt[:, None]),
                              jnp.int32(pos), nb)
      if return_logits:
        kept.append(np.asarray(logits))
      last = logits[:, 0]

    all_logits = np.concatenate(kept, axis=1) if return_logits else None
    out = []
    for i in range(b):
      n_gen = int(min(ends[i], produced))
      gen = seq[i, p:p + n_gen].tolist()
      out.append(Generation(
          prompt_tokens=prompt[i].tolist(), tokens=gen, text=self.tokenizer.decode(gen),
          full_text=self.tokenizer.decode(prompt[i].tolist() + gen),
          stop_reason="eos" if done[i] else "length",
          neighbor_ids=np.asarray(nb_ids[i], np.int64).reshape(-1, self.k),
          neighbor_tokens=np.asarray(nb_toks[i], np.int32).reshape(-1, self.k, r),
          logits=None if all_logits is None else all_logits[i]))
    return out


def fed_tokens(g: Generation) -> list[int]:
  """The tokens the model was fed (prompt + all generated but the last): the sequence
  whose full forward pass the returned logits must match."""
  return g.prompt_tokens + g.tokens[:-1]


__all__ = ["Generator", "Generation", "SamplingParams", "GenerationError", "filter_logits",
           "sample_tokens", "fed_tokens"]


def run_generation(workdir: str, prompts: Sequence[str], *,
                   sampling: SamplingParams = SamplingParams(), **options) -> list[Generation]:
  """`generate(GenerateConfig(workdir, prompt=prompts, sampling=sampling, **options))`;
  `db_dir` names `db`, and `retrieval` is a bool."""
  if "db_dir" in options:
    options["db"] = options.pop("db_dir")
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  return generate(GenerateConfig(workdir=workdir, prompt=tuple(prompts), sampling=sampling,
                                 **options))


def generate(config: GenerateConfig) -> list[Generation]:
  """The `python -m retro_jax.generate` job: load, check, open retrieval, sample."""
  prompts = config.prompts()
  if not prompts or any(not p or not p.strip() for p in prompts):
    raise GenerationError("empty prompt: give non-empty --prompt text (or lines in "
                          "--prompts_file)")
  model = ckpt_lib.load_model(config.workdir, config.step, not config.skip_content_check)
  retrieves = config.retrieval and model.config.uses_retrieval
  if retrieves and not config.db and not config.retrieval_url:
    raise GenerationError("a RETRO model retrieves every chunk: pass --db or "
                          "--retrieval_url (or --retrieval=off)")
  session = session_lib.connect(model, db=config.db, retrieval_url=config.retrieval_url,
                                live=retrieves, service_timeout=config.service_timeout,
                                chunk_size=retrieves,
                                check_contents=not config.skip_content_check)
  retriever = session.retriever
  tok = session.tokenizer(config.tokenizer)
  provenance.check({"tokenizer": tok.identity()}, model.expected(chunk_size=False),
                   f"tokenizer {tok.path}")
  gen = Generator(model.params, model.config, tok, retriever, config.num_neighbors)
  return gen.generate(prompts, config.sampling)
