r"""An lm-evaluation-harness model for any retro_jax workdir, retrieving live.

  retro-lm-eval --model retro_jax \
      --model_args workdir=runs/retro,db=DB[,k=2,seq_len=256,retrieval=on] \
      --batch_size 8 --tasks hellaswag   # or your own: --include_path my_tasks/ --tasks my_task

(`python -m retro_jax.harness` is the same; it registers the model name `retro_jax` and
runs lm-eval's own command line.)  From Python:
`lm_eval.simple_evaluate(model=RetroLM(workdir, db=DB), tasks=[...])`.

Retrieval: `db=DIR` (in process) or `retrieval_url=http://HOST:PORT` (a running
`retro-serve`; a model trained with aligned / filtered neighbors also needs `db`, whose
tokens alignment reads); `retrieval=off` scores RETRO without neighbors; a baseline workdir
needs neither.  Every complete chunk of m tokens of a request is sent to the retriever with
its own tokens, exactly as evaluation and generation do (causal: its neighbors reach only
positions from its last token on), presented as the model was trained (generation/sampler.py
`Generator.retrieve`).

- `loglikelihood(context, continuation)`: the sequence is [eos] + context + continuation
  tokenised as one text (the continuation's tokens are those past the context's own
  tokenisation where that is a prefix, else it is tokenised alone), cut to the last
  `seq_len` + 1 tokens; returns (sum of log p(continuation token), whether every one is
  the greedy choice).
- `loglikelihood_rolling(text)`: every token of the text scored once, t_0 after [eos],
  the rest in windows of `seq_len` tokens with stride seq_len / 2 whose chunks start at
  t_0: exactly as `retro-evaluate` scores a document (tested equal).
- `generate_until(context, gen_kwargs)`: KV-cache sampling with live retrieval
  (`Generator`), greedy unless `do_sample`/`temperature` say otherwise, `max_gen_toks`
  tokens at most, cut at the first of `until`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

try:  # lm-eval is optional: `pip install 'retro_jax[lm_eval]'`
  from lm_eval.api.model import LM as _Base
  from lm_eval.api.registry import register_model as _register
except ImportError:  # pragma: no cover - exercised only without lm-eval
  _Base = object
  _register = None


def _as_bool(v: Any) -> bool:
  if isinstance(v, str):
    if v.lower() in ("1", "true", "on", "yes"):
      return True
    if v.lower() in ("0", "false", "off", "no"):
      return False
    raise ValueError(f"retrieval={v!r}: expected on or off")
  return bool(v)


class RetroLM(_Base):
  """lm-eval's `LM` over a retro_jax checkpoint with live retrieval."""

  def __init__(self, workdir: str, db: str | None = None, retrieval_url: str | None = None,
               k: int | None = None, batch_size: int = 8, seq_len: int | None = None,
               retrieval: Any = True, step: int | None = None, tokenizer: str | None = None,
               **unused):
    if _Base is object:
      raise ImportError("lm-eval is not installed: pip install 'retro_jax[lm_eval]'")
    super().__init__()
    # Heavy imports here, so importing the module (for the registry) stays cheap.
    from retro_jax.evaluation import scoring  # pylint: disable=g-import-not-at-top
    from retro_jax.generation import sampler  # pylint: disable=g-import-not-at-top
    from retro_jax.inference import session as session_lib  # pylint: disable=g-import-not-at-top
    del unused  # lm-eval passes device etc.; JAX picks its own devices
    live = _as_bool(retrieval)
    self._scoring, self._sampler = scoring, sampler
    self.session = session_lib.open_session(workdir, step, db=db, retrieval_url=retrieval_url,
                                            live=live)
    model = self.session.model
    self.config = model.config
    self.params = model.params
    self.tok = self.session.tokenizer(tokenizer)
    m = self.config.chunk_size
    train_len = int((model.train_config or {}).get("seq_len") or 4 * m)
    self.seq_len = int(seq_len or train_len)
    if self.seq_len <= 0 or self.seq_len % m:
      raise ValueError(f"seq_len {self.seq_len} must be a positive multiple of the chunk "
                       f"size {m}")
    # lm-eval's --batch_size arrives here too ("auto" is not searched for: 8).
    self.batch = 8 if str(batch_size).startswith("auto") else max(1, int(batch_size))
    uses = self.config.uses_retrieval and live
    if self.config.uses_retrieval and live and self.session.retriever is None:
      raise ValueError("this RETRO model retrieves: give db=DB_DIR or retrieval_url=URL "
                       "(or retrieval=off to score it without neighbors)")
    self.k = int(k or self.config.num_neighbors)
    self.generator = sampler.Generator(self.params, self.config, self.tok,
                                       self.session.retriever if uses else None, self.k)
    self.uses_retrieval = uses
    import jax  # pylint: disable=g-import-not-at-top
    logits_fn = scoring.retro_logits_fn(self.config)
    self._log_probs = jax.jit(lambda params, x, nb: jax.nn.log_softmax(
        logits_fn(params, x, nb).astype("float32"), axis=-1))

  # --- lm-eval's interface ------------------------------------------------------------
  @property
  def eot_token_id(self) -> int:
    return int(self.tok.eos_id)

  def tok_encode(self, text: str) -> list[int]:
    return list(self.tok.encode(text)) if text else []

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    rows = []
    for req in requests:
      context, continuation = req.args
      ctx, cont = self._split_tokens(context, continuation)
      seq = [self.eot_token_id] + ctx + cont
      seq = seq[-(self.seq_len + 1):]
      n_cont = min(len(cont), len(seq) - 1)
      rows.append((np.asarray(seq, np.int32), n_cont))
    out = []
    for lo in range(0, len(rows), self.batch):
      part = rows[lo:lo + self.batch]
      inputs = [r[0][:-1] for r in part]
      targets = [r[0][1:] for r in part]
      weights = [np.r_[np.zeros(len(t) - n), np.ones(n)].astype(np.float32)
                 for t, (_, n) in zip(targets, part)]
      nll, greedy = self._score(inputs, targets, weights)
      out += [(-float(a), bool(g)) for a, g in zip(nll, greedy)]
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    scoring = self._scoring
    m, n = self.config.chunk_size, self.seq_len
    stride = scoring.default_stride(n, m)
    out = []
    for req in requests:
      doc = np.asarray(self.tok_encode(req.args[0]), np.int32)
      if not len(doc):
        out.append(0.0)
        continue
      # As retro-evaluate scores a document: t_0 after [eos], then windows over the
      # document's own tokens (chunks start at t_0), every token scored once.
      nll0, _ = self._score([np.asarray([self.eot_token_id], np.int32)], [doc[:1]],
                            [np.ones(1, np.float32)])
      total = float(nll0[0])
      inputs, targets, weights = [], [], []
      for w in scoring.plan_windows(len(doc), n, stride, m, 0):
        inputs.append(doc[w.start:w.start + w.length])
        targets.append(doc[w.start + 1:w.start + w.length + 1])
        wt = np.zeros(w.length, np.float32)
        wt[w.score_from - w.start:] = 1.0
        weights.append(wt)
      for lo in range(0, len(inputs), self.batch):
        nll, _ = self._score(inputs[lo:lo + self.batch], targets[lo:lo + self.batch],
                             weights[lo:lo + self.batch])
        total += float(np.sum(nll))
      out.append(-total)
    return out

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    out = []
    for req in requests:
      context, kwargs = req.args
      kwargs = dict(kwargs or {})
      until = kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(kwargs.pop("max_gen_toks", 128))
      temperature = float(kwargs.pop("temperature", 0.0))
      if not kwargs.pop("do_sample", False):
        temperature = 0.0
      prompt = ([self.eot_token_id] + self.tok_encode(context))[-self.seq_len:]
      gen = self.generator.generate_tokens(
          [prompt], self._sampler.SamplingParams(max_new_tokens=max_new,
                                                 temperature=temperature,
                                                 seed=int(kwargs.pop("seed", 0))))[0]
      text = gen.text
      cut = [text.index(u) for u in until if u and u in text]
      out.append(text[:min(cut)] if cut else text)
    return out

  # --- internals ----------------------------------------------------------------------
  def _split_tokens(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    whole = self.tok_encode(context + continuation)
    ctx = self.tok_encode(context)
    if ctx and whole[:len(ctx)] == ctx and len(whole) > len(ctx):
      return ctx, whole[len(ctx):]
    return ctx, self.tok_encode(continuation)

  def neighbors(self, inputs: np.ndarray) -> np.ndarray | None:
    """[n] input tokens -> [ceil(n/m), k, r] neighbor tokens (a partial last chunk: -1)."""
    if not self.uses_retrieval:
      return None
    m, r = self.config.chunk_size, self.config.neighbor_len
    full = len(inputs) // m
    out = np.full((-(-len(inputs) // m), self.k, r), -1, np.int32)
    if full:
      _, toks = self.generator.retrieve(np.asarray(inputs[:full * m]).reshape(full, m))
      out[:full] = toks
    return out

  def _score(self, inputs: Sequence[np.ndarray], targets: Sequence[np.ndarray],
             weights: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of up to seq_len tokens, padded to [batch, seq_len] (one compiled shape) ->
    per-row NLL sums over weighted targets, and whether each weighted target is argmax."""
    n, b, m = self.seq_len, self.batch, self.config.chunk_size
    x = np.zeros((b, n), np.int32)
    y = np.zeros((b, n), np.int32)
    w = np.zeros((b, n), np.float32)
    nb = None
    if self.uses_retrieval:
      nb = np.full((b, n // m, self.k, self.config.neighbor_len), -1, np.int32)
    for i, (a, t, wt) in enumerate(zip(inputs, targets, weights)):
      x[i, :len(a)], y[i, :len(t)], w[i, :len(wt)] = a, t, wt
      if nb is not None:
        got = self.neighbors(a)
        nb[i, :len(got)] = got
    logp = np.asarray(self._log_probs(self.params, x, nb))
    picked = np.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
    nll = -(picked * w).sum(axis=-1)
    greedy = ((logp.argmax(-1) == y) | (w == 0)).all(axis=-1)
    rows = len(inputs)
    return nll[:rows], greedy[:rows]


if _register is not None:
  _register("retro_jax")(RetroLM)
