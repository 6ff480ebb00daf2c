r"""Does a bfloat16 embedder change the neighbors?  Recall of bfloat16 keys and queries
against float32 ones, on real text, with the throughput of both in the same run.

The database keys are N stdlib-source chunks (64 BERT tokens), the queries the next Q
chunks (other files).  Reference: exact top-k by dot product with float32 keys and
queries.  Tested: the same search with both sides embedded in bfloat16 (what a database
built with `--embed_dtype=bfloat16` and queried with the same embedder gives).  Exact
search on both sides, so the figure is the embedder's effect alone, not the index's.

Usage:
  .venv/bin/python experiments/benchmarks/bench_embed_dtype.py --keys=8192 --queries=512
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_integer("keys", 8192, "Database chunks.")
flags.DEFINE_integer("queries", 512, "Query chunks (the chunks after the keys).")
flags.DEFINE_integer("chunk_tokens", 64, "BERT tokens per chunk including [CLS]/[SEP].")
flags.DEFINE_integer("batch_size", 128, "Chunks per embedder call (build_db's default).")
flags.DEFINE_integer("threads", 2, "Threads for XLA.")
flags.DEFINE_string("name", "embed_dtype", "results/<name>.json")


def _top(q, k, n):
  import numpy as np  # pylint: disable=g-import-not-at-top
  scores = q.astype(np.float64) @ k.astype(np.float64).T
  return np.argsort(-scores, axis=1, kind="stable")[:, :n]


def main(argv):
  del argv
  if FLAGS.keys < 10 or FLAGS.queries < 1:
    raise app.UsageError("--keys must be >= 10 and --queries >= 1")
  common.pin_threads(FLAGS.threads)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.embed import embedder as embedder_lib  # pylint: disable=g-import-not-at-top

  f32 = embedder_lib.Embedder.from_pretrained(None, batch_size=FLAGS.batch_size)
  bf16 = f32.with_settings(dtype="bfloat16", batch_size=FLAGS.batch_size)
  total = FLAGS.keys + FLAGS.queries
  chunks, _ = common.real_bert_chunks(f32.tokenizer, total, FLAGS.chunk_tokens - 2)
  if len(chunks) < total:
    raise app.UsageError(f"the stdlib gave only {len(chunks)} chunks of "
                         f"{FLAGS.chunk_tokens} tokens; lower --keys/--queries")
  f32.embed_token_ids(chunks[:FLAGS.batch_size])   # compile outside the timing
  bf16.embed_token_ids(chunks[:FLAGS.batch_size])
  emb, secs = {}, {}
  for name, e in (("float32", f32), ("bfloat16", bf16)):
    t0 = time.perf_counter()
    emb[name] = e.embed_token_ids(chunks)
    secs[name] = time.perf_counter() - t0
  a, b = emb["float32"], emb["bfloat16"]
  cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
  keys, queries = slice(0, FLAGS.keys), slice(FLAGS.keys, total)
  ref = _top(a[queries], a[keys], 10)
  got = _top(b[queries], b[keys], 10)
  recall = {f"recall@{k}": float(np.mean([len(set(r[:k]) & set(g[:k])) / k
                                          for r, g in zip(ref, got)])) for k in (1, 2, 10)}
  rows = [dict(dtype=name, chunks_per_s=total / secs[name]) for name in secs]
  common.print_table(rows, ["dtype", "chunks_per_s"],
                     title=f"{total} chunks of {FLAGS.chunk_tokens} tokens, batch "
                           f"{FLAGS.batch_size}, {FLAGS.threads} threads")
  print(f"cosine(float32, bfloat16) per chunk: min {cos.min():.5f}, mean {cos.mean():.5f}")
  print(f"bfloat16 vs float32 neighbors ({FLAGS.queries} queries, {FLAGS.keys} keys, exact "
        "search): " + ", ".join(f"{k} {v:.3f}" for k, v in recall.items()))
  payload = dict(machine=common.machine_info(), command=" ".join(sys.argv),
                 keys=FLAGS.keys, queries=FLAGS.queries, chunk_tokens=FLAGS.chunk_tokens,
                 batch_size=FLAGS.batch_size, threads=FLAGS.threads,
                 seconds=secs, chunks_per_s={k: total / v for k, v in secs.items()},
                 cosine_min=float(cos.min()), cosine_mean=float(cos.mean()), **recall)
  print("wrote", common.write_json(FLAGS.name, payload))


if __name__ == "__main__":
  # Run as build_db does (retro_jax/host_malloc.py).
  from retro_jax import host_malloc  # pylint: disable=g-import-not-at-top
  host_malloc.reexec_with_tuned_malloc()
  app.run(main)
