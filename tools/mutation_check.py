"""Mutation check of the test suite: deliberate bugs that the tests must catch.

Each entry of MUTATIONS is a named bug: one or more exact text substitutions in one module
of retro_jax/, and the test files (or test ids) that should catch it.  For every bug the
script copies retro_jax/, tests/ and experiments/configs/ into a fresh temporary directory
(the working tree is never modified), applies the substitutions there, and runs the
matching tests with pytest against the copy (PYTHONPATH and the working directory point at
the copy, so the copy's modules shadow the editable install).  A bug is

  caught    the tests failed (pytest exit status 1; 2 = the copy no longer imports, shown
            as "caught (error)"),
  SURVIVED  the tests passed: they cannot tell the bug from the correct code,
  TARGET NOT FOUND  a substitution's text no longer occurs in the module (the code changed:
            update the entry), never silently skipped,
  NO TESTS  pytest collected nothing (a renamed test: update the entry).

First the same tests run on an unmodified copy: if they fail there, a "caught" would mean
nothing, and the script stops.  It prints a table and exits non-zero unless every bug is
caught.

  .venv/bin/python tools/mutation_check.py              # all bugs
  .venv/bin/python tools/mutation_check.py --only cca   # names containing "cca"
  .venv/bin/python tools/mutation_check.py --list       # the table of bugs, nothing run
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = ("retro_jax", "tests", os.path.join("experiments", "configs"))


@dataclasses.dataclass(frozen=True)
class Mutation:
  name: str
  module: str                            # path under the repository root
  edits: tuple[tuple[str, str], ...]     # (exact old text, new text), each must occur
  tests: tuple[str, ...]                 # pytest ids relative to the root (files or ::tests)


def _m(name, module, edits, *tests):
  return Mutation(name, module, tuple(edits), tuple(tests))


MUTATIONS: tuple[Mutation, ...] = (
    # --- model: positions and windows -----------------------------------------------------
    _m("CCA without the m-1 shift (windows = chunks)", "retro_jax/model/cca.py", [
        ("(0, 0)))[:, m - 1:]", "(0, 0)))[:, 0:]"),
        ("h = jnp.pad(h, ((0, 0), (0, m - 1), (0, 0)))", "h = jnp.pad(h, ((0, 0), (0, 0), (0, 0)))"),
        ("w = jnp.pad(w, ((0, 0), (m - 1, 0), (0, 0)))", "w = jnp.pad(w, ((0, 0), (0, 0), (0, 0)))"),
    ], "tests/test_model.py", "tests/test_reference.py"),
    _m("CCA distance i - j instead of i - j + m - 1", "retro_jax/model/cca.py", [
        ("layers.skew_distances(chunk_size, neighbor_len, chunk_size - 1, causal=False)",
         "layers.skew_distances(chunk_size, neighbor_len, 0, causal=False)"),
    ], "tests/test_reference.py"),
    _m("CCA ignores the neighbor-token mask", "retro_jax/model/cca.py", [
        ("out = heads_last(self.attn.attend(logits, mask, values))",
         "out = heads_last(self.attn.attend(logits, jnp.ones_like(mask), values))"),
    ], "tests/test_model.py"),
    _m("XL distance table reversed (j - i)", "retro_jax/model/layers.py", [
        ("return base + nq - 1 - np.arange(width)", "return base - nq + 1 + np.arange(width)"),
    ], "tests/test_reference.py"),
    _m("XL relative shift off by one column", "retro_jax/model/layers.py", [
        ("flat = flat[..., nq - 1: nq - 1 + nq * (width - 1)]",
         "flat = flat[..., nq: nq + nq * (width - 1)]"),
    ], "tests/test_reference.py"),
    _m("encoder cross-attention distance i - j + 1", "retro_jax/model/encoder.py", [
        ("layers.skew_distances(r, m, 0, causal=False)",
         "layers.skew_distances(r, m, 1, causal=False)"),
    ], "tests/test_reference.py"),
    _m("encoder cross-attention distances run across the k neighbors",
       "retro_jax/model/encoder.py", [
           ("pos = layers.skew(pos.reshape(pos.shape[:-2] + (k, r, pos.shape[-1])), m)",
            "pos = layers.skew(pos, m)"),
       ], "tests/test_reference.py"),
    _m("decoder self-attention not causal", "retro_jax/model/attention.py", [
        ("      mask = jnp.tril(mask)", "      mask = mask"),
    ], "tests/test_model.py"),
    _m("grouped-query (rope) self-attention not causal", "retro_jax/model/gqa.py", [
        ("mask = jnp.tril(jnp.ones((n, n), bool))", "mask = jnp.ones((n, n), bool)"),
    ], "tests/test_families.py::test_future_tokens_and_later_neighbors_do_not_change_past_logits"),
    _m("rope rotates the other way (sin sign flipped)", "retro_jax/model/gqa.py", [
        ("jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s]",
         "jnp.concatenate([x1 * c + x2 * s, x2 * c - x1 * s]"),
    ], "tests/test_lm_import.py::test_hf_import_matches_transformers_logits"),
    _m("GGUF llama q/k left in llama.cpp's permuted layout", "retro_jax/pretrained/gguf_file.py", [
        ('if self.arch == "llama" and hf.endswith', 'if False and hf.endswith'),
    ], "tests/test_lm_import.py::test_gguf_import_matches_transformers_gguf_loading"),
    _m("bfloat16 checkpoints compared in float32 (every converted release refused)",
       "retro_jax/training/checkpoint.py", [
        ("int(want) != value and not _matches_as_saved(leaves[path], want):",
         "int(want) != value:"),
    ], "tests/test_import_megatron.py::test_a_bfloat16_checkpoint_converts_and_loads_with_its_content_check"),
    _m("GPT-2 c_attn split as k, q, v", "retro_jax/pretrained/hf.py", [
        ('    for j, x in enumerate("qkv"):\n      attn["w" + x]', '    for j, x in enumerate("kqv"):\n      attn["w" + x]'),
    ], "tests/test_lm_import.py::test_gpt2_import_matches_transformers_logits"),
    _m("-1 neighbor tokens not masked in the encoder", "retro_jax/model/encoder.py", [
        ("mask = neighbors >= 0", "mask = neighbors > -1000"),
    ], "tests/test_model.py"),
    # --- model: precision and memory --------------------------------------------------------
    _m("bf16: RMSNorm statistics in bfloat16", "retro_jax/model/layers.py", [
        ("    x32 = x.astype(jnp.float32)", "    x32 = x"),
    ], "tests/test_model.py::test_bfloat16_keeps_softmax_and_norm_statistics_in_float32"),
    _m("bf16: softmax in bfloat16", "retro_jax/model/attention.py", [
        ("probs = jax.nn.softmax(logits, axis=-1)",
         "probs = jax.nn.softmax(logits.astype(v.dtype), axis=-1)"),
    ], "tests/test_model.py::test_bfloat16_keeps_softmax_and_norm_statistics_in_float32"),
    _m("remat flag ignored", "retro_jax/model/retro.py", [
        ("    if c.remat:", "    if False:  # c.remat"),
    ], "tests/test_model.py::test_remat_is_in_the_jaxpr"),
    _m("share_embeddings ignored (encoder keeps its own table)", "retro_jax/model/retro.py", [
        ("shared_embedding=self.embed if c.share_embeddings else None", "shared_embedding=None"),
    ], "tests/test_model.py::test_shared_embeddings_option"),
    # --- training data ---------------------------------------------------------------------
    _m("loader keeps neighbors from other documents of the window",
       "retro_jax/training/data.py", [
           ("ids = np.where(same, -1, ids)", "ids = ids"),
       ], "tests/test_data.py"),
    _m("loader targets not shifted by one", "retro_jax/training/data.py", [
        ("inputs, targets = seq[:, :-1], seq[:, 1:]", "inputs, targets = seq[:, :-1], seq[:, :-1]"),
    ], "tests/test_data.py"),
    _m("every process loads the first rows of the global batch", "retro_jax/training/data.py", [
        ("    lo = self.process_index * self.local_batch_size", "    lo = 0"),
    ], "tests/test_data.py::test_process_shards_concatenate_to_the_global_batch"),
    # --- retrieval -------------------------------------------------------------------------
    _m("precompute: no same-document exclusion", "retro_jax/retrieval/jobs/precompute.py", [
        ("      elif self.query_is_db:\n        groups = q_doc",
         "      elif self.query_is_db:\n        groups = np.full(q_doc.shape, -1, np.int64)"),
    ], "tests/test_precompute.py"),
    _m("search_excluding keeps the excluded group", "retro_jax/retrieval/search/exact.py", [
        ("keep = (ids >= 0) & (groups != exclude_groups[rows][:, None])", "keep = ids >= 0"),
    ], "tests/test_index.py"),
    _m("tokenizer identity check skipped", "retro_jax/fileio.py", [
        ("  check_equal(what, exp, act, expected_source, actual_source)", "  del exp, act"),
    ], "tests/test_evaluate.py::test_tokenizer_mismatch_is_refused_naming_both",
       "tests/test_precompute.py::test_manifest_mismatches_are_refused"),
    _m("provenance check ignores the tokenizer", "retro_jax/provenance.py", [
        ("  if expected.tokenizer and tok:", "  if False:"),
    ], "tests/test_evaluate.py::test_tokenizer_mismatch_is_refused_naming_both",
       "tests/test_build_db.py::test_database_refuses_foreign_chunk_store_and_chunk_size"),
    # --- training --------------------------------------------------------------------------
    _m("gradient accumulation averages per microbatch (scale 1/A)",
       "retro_jax/training/trainer.py", [
           ("return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, count_acc + count), None",
            "return (jax.tree.map(lambda a, b: a + b / accum_steps, g_acc, g), "
            "nll_acc + nll, count_acc + count), None"),
       ], "tests/test_train.py::test_gradient_accumulation_matches_one_big_batch"),
    _m("AdamW betas swapped", "retro_jax/training/optim.py", [
        ("b1=float(opt.b1), b2=float(opt.b2)", "b1=float(opt.b2), b2=float(opt.b1)"),
    ], "tests/test_train_optim.py"),
    _m("global-norm clipping dropped", "retro_jax/training/optim.py", [
        ("    parts.append(optax.clip_by_global_norm(float(opt.grad_clip_norm)))", "    pass"),
    ], "tests/test_train_optim.py"),
    _m("weight decay on norm scales and biases too", "retro_jax/training/optim.py", [
        ("not (names and _NO_DECAY.search(names[-1]))", "True"),
    ], "tests/test_train_optim.py"),
    _m("RETRO-fitting updates the frozen decoder", "retro_jax/training/optim.py", [
        ("lambda label, p, q: p if label == FROZEN else q", "lambda label, p, q: q"),
    ], "tests/test_train_optim.py"),
    _m("retrofit.unfreeze_decoder=True ignored", "retro_jax/training/trainer.py", [
        ("  if unfreeze_decoder:\n    return None", "  if False:\n    return None"),
    ], "tests/test_train_retrofit.py::test_retrofit_freezes_the_baseline_and_trains_encoder_and_cca"),
    _m("--config.distributed=True does not initialise jax.distributed",
       "retro_jax/training/trainer.py", [
           ("  if cfg.distributed or coordinator_address:", "  if coordinator_address:"),
       ], "tests/test_train_cli.py::test_distributed_flag_initialises_jax_distributed_before_training"),
    # --- evaluation and generation ---------------------------------------------------------
    _m("evaluation windows advance by n, not by the stride", "retro_jax/evaluation/scoring.py", [
        ("    start += stride", "    start += seq_len"),
    ], "tests/test_evaluate.py::test_windows_score_every_token_exactly_once"),
    _m("bits per byte divides by tokens, not bytes", "retro_jax/evaluation/evaluate.py", [
        ("bpb=float(nll / math.log(2) / nbytes) if nbytes else None)",
         "bpb=float(nll / math.log(2) / tokens) if nbytes else None)"),
    ], "tests/test_evaluate.py::test_uniform_model_gives_vocab_perplexity",
       "tests/test_evaluate.py::test_bigram_model_equals_hand_computation"),
    _m("evaluation windows read the document's first neighbors", "retro_jax/evaluation/evaluate.py", [
        ("c0 = int(docs.doc_offsets[w.doc]) + w.start // m", "c0 = int(docs.doc_offsets[w.doc])"),
    ], "tests/test_evaluate.py::test_each_window_chunk_gets_its_own_neighbors"),
    _m("r(C) from the 2 nearest chunks, not the paper's 10", "retro_jax/evaluation/leakage.py", [
        ("NUM_LEAKAGE_NEIGHBORS = 10", "NUM_LEAKAGE_NEIGHBORS = 2"),
    ], "tests/test_evaluate.py::test_live_service_and_precomputed_retrieval_give_the_same_report"),
    _m("sampling ignores the temperature", "retro_jax/generation/sampler.py", [
        ("logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)",
         "logits = logits.astype(jnp.float32)"),
    ], "tests/test_generate.py::test_sampling_frequencies_follow_temperature_and_top_p"),
    _m("nucleus (top-p) taken from the untempered distribution", "retro_jax/generation/sampler.py", [
        ("probs = jax.nn.softmax(desc, axis=-1)",
         "probs = jax.nn.softmax(desc * jnp.maximum(temperature, 1e-6), axis=-1)"),
    ], "tests/test_generate.py::test_sampling_frequencies_follow_temperature_and_top_p"),
    # --- reading options (retrieval/store/align.py, model/copy.py, the CCA gate) -----------------
    _m("alignment ignores the best shift", "retro_jax/retrieval/store/align.py", [
        ("starts = m + shifts[pick]", "starts = m + 0 * shifts[pick]"),
    ], "tests/test_reading.py"),
    _m("min-match filter keeps neighbors with short matches", "retro_jax/retrieval/store/align.py", [
        ("keep &= best >= presentation.min_match", "keep &= best >= 0"),
    ], "tests/test_reading.py"),
    _m("the loader ignores the neighbor presentation", "retro_jax/training/data.py", [
        ("self.presentation = self.retrieval.presentation or align_lib.Presentation()",
         "self.presentation = align_lib.Presentation()"),
    ], "tests/test_reading.py::test_the_training_loader_shows_neighbors_as_the_config_says"),
    _m("copy head distance table off by one", "retro_jax/model/copy.py", [
        ("return i - j + neighbor_len - 1", "return i - j + neighbor_len"),
    ], "tests/test_reading.py"),
    _m("copy head reads the next chunk's neighbors", "retro_jax/model/copy.py", [
        ("ids = jnp.broadcast_to(neighbors.reshape(b, l, 1, k * r), weights.shape)",
         "ids = jnp.broadcast_to(jnp.roll(neighbors, -1, axis=1).reshape(b, l, 1, k * r), "
         "weights.shape)"),
    ], "tests/test_reading.py"),
    _m("the copy mixture trains the decoder", "retro_jax/model/copy.py", [
        ("log_model = jax.lax.stop_gradient(jax.nn.log_softmax(", "log_model = (jax.nn.log_softmax("),
    ], "tests/test_reading.py"),
    _m("CCA gate ignored", "retro_jax/model/retro.py", [
        ("    if not self.config.cca_gate:\n      return y", "    if True:\n      return y"),
    ], "tests/test_reading.py"),
    # --- NVIDIA's Megatron RETRO (import and wiring) ----------------------------------------------
    _m("Megatron SwiGLU shards concatenated naively (gate and up interleaved)",
       "retro_jax/megatron/legacy.py", [
           ("    if arch.activation != \"swiglu\":\n      return np.concatenate(parts, axis=0)",
            "    if True:\n      return np.concatenate(parts, axis=0)"),
       ], "tests/test_megatron_checkpoint.py"),
    _m("Megatron LayerNorm-1p weights read without the +1", "retro_jax/megatron/legacy.py", [
        ("      out = out + np.float32(1.0)", "      out = out"),
    ], "tests/test_megatron_checkpoint.py"),
    _m("Megatron encoder reads the raw chunk states, not the CCA-normed ones",
       "retro_jax/model/retro.py", [
           ("    if self.config.retrieval_wiring == \"megatron\":\n      return self.cca_norm(x)",
            "    if False:\n      return self.cca_norm(x)"),
       ], "tests/test_megatron_parity.py"),
    _m("Megatron CCA scale (retro_attention_gate) ignored", "retro_jax/model/megatron.py", [
        ("    return y * jnp.asarray(self.scale, y.dtype)", "    return y"),
    ], "tests/test_megatron_model.py"),
    # --- retrieval: sharded databases ---------------------------------------------------------
    _m("ScaNN SIMD raises a kernel level the CPU lacks", "retro_jax/retrieval/search/scann_simd.py", [
        ("and all(f in have for f in REQUIRES[level])", "and True"),
    ], "tests/test_scann_simd.py"),
    _m("sharded search returns shard-local ids", "retro_jax/retrieval/db/sharded.py", [
        ("return (np.where(gone, -1, ids + offset),", "return (np.where(gone, -1, ids),"),
    ], "tests/test_sharded.py"),
    _m("sharded doc ids not offset per shard", "retro_jax/retrieval/db/sharded.py", [
        ('ConcatRows([s.doc_ids for s in self.stores], value_offsets=doc_offsets)',
         'ConcatRows([s.doc_ids for s in self.stores])'),
    ], "tests/test_sharded.py"),
    _m("sharded search asks each shard for k only (dropped chunks eat the top k)",
       "retro_jax/retrieval/db/sharded.py", [
        ("kk = min(k + len(dropped), ix.num_vectors)", "kk = min(k, ix.num_vectors)"),
    ], "tests/test_sharded.py::test_dropped_documents_are_never_retrieved"),
    # --- no silent wrong answer (issue #36) ---------------------------------------------------
    _m("content check compares nothing (same-shape damage passes)", "retro_jax/integrity.py", [
        ("    if got != expected:\n      raise ContentError(",
         "    if False:\n      raise ContentError("),
    ], "tests/test_content_check.py::test_reordered_tokens_stop_evaluate_and_generate",
       "tests/test_content_check.py::test_train_refuses_reordered_rows"),
    _m("live retrieval skips the index files' hashes", "retro_jax/inference/session.py", [
        ('db_parts=("chunks", "index") if local else ("chunks",)', 'db_parts=("chunks",)'),
    ], "tests/test_content_check.py::test_reordered_index_file_stops_live_retrieval"),
    _m("serve starts without the content check", "retro_jax/serve.py", [
        ('skip=config.skip_content_check, job="serve"', 'skip=True, job="serve"'),
    ], "tests/test_content_check.py::test_serve_cli_refuses_a_reordered_index_in_one_line"),
    _m("train checks neither neighbors file", "retro_jax/training/trainer.py", [
        ("      neighbors=[n for n in (k and d.neighbors_dir,", "      neighbors=[n for n in (None,"),
        ("k and d.eval_chunks_dir and\n                             d.eval_neighbors_dir) if n],",
         "None) if n],"),
    ], "tests/test_content_check.py::test_train_refuses_reordered_rows"),
    _m("checkpoint fingerprint not position-weighted (a row swap passes)",
       "retro_jax/training/checkpoint.py", [
        ("return jnp.sum((bits ^ (bits >> 15)) * weight, dtype=jnp.uint32)",
         "return jnp.sum((bits ^ (bits >> 15)), dtype=jnp.uint32)"),
        ("np.sum((b ^ (b >> np.uint32(15))) * weight, dtype=np.uint32)",
         "np.sum((b ^ (b >> np.uint32(15))), dtype=np.uint32)"),
    ], "tests/test_content_check.py::test_fingerprint_does_not_depend_on_sharding_and_sees_a_swap",
       "tests/test_content_check.py::test_reordered_checkpoint_array_is_refused"),
    _m("load_model does not fall back past a step without state/", "retro_jax/inference/checkpoints.py", [
        ("      candidates = ckpt.all_steps()[::-1]", "      candidates = ckpt.all_steps()[::-1][:1]"),
    ], "tests/test_content_check.py::test_evaluate_and_generate_fall_back_from_a_step_without_state_or_config"),
    _m("ENOSPC not recognised as a full disk", "retro_jax/fileio.py", [
        ("_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)", "_FULL_ERRNOS = (errno.EDQUOT,)"),
    ], "tests/test_disk_full.py"),
    _m("embeddings assembled through a writable memory map (SIGBUS on a full disk)",
       "retro_jax/retrieval/jobs/build.py", [
        ("          for lo in range(0, len(part), 1 << 16):",
         "          np.lib.format.open_memmap(tmp + '.m', mode='w+', dtype=dtype, shape=(1, dim))\n"
         "          for lo in range(0, len(part), 1 << 16):"),
    ], "tests/test_disk_full.py::test_embedding_assembly_on_a_full_disk_is_one_line_not_sigbus"),
    _m("checkpoint save errors not reduced to one disk-full line", "retro_jax/training/checkpoint.py", [
        ("      if not fileio.is_disk_full(e):\n        raise\n      logging.debug(\"checkpoint save",
         "      if True:\n        raise\n      logging.debug(\"checkpoint save"),
    ], "tests/test_disk_full.py::test_checkpoint_save_on_a_full_disk"),
    _m("a full disk's other tracebacks printed (threads, asyncio, atexit)", "retro_jax/_cli.py", [
        ("  host_malloc.reexec_with_tuned_malloc()\n  _quiet_after_disk_full()\n",
         "  host_malloc.reexec_with_tuned_malloc()\n"),
    ], "tests/test_disk_full.py::test_a_command_on_a_full_disk_prints_one_line"),
    _m("router merges an answer from another index (a service replaced on a shard address)",
       "retro_jax/retrieval/serve/router.py", [
        ('    if want is not None and answer.get("index_id") != want:', "    if False:"),
    ], "tests/test_router_guard.py::test_a_service_replaced_on_a_shard_address_is_never_merged"),
    _m("router passes on ids beyond a shard", "retro_jax/retrieval/serve/router.py", [
        ("    if ids.size and (int(ids.min()) < -1 or int(ids.max()) >= n):", "    if False:"),
    ], "tests/test_router_guard.py::test_ids_outside_a_shard_are_refused"),
    _m("router /health does not ask the shards", "retro_jax/retrieval/serve/router.py", [
        ("    states = list(self._fanout.map(lambda s: s.state(), index.shards))",
         "    states = [dict(name=s.name, state=\"ok\") for s in index.shards]"),
    ], "tests/test_router_guard.py::test_health_names_a_shard_that_is_down"),
    _m("router keeps a stale reload_error", "retro_jax/retrieval/serve/router.py", [
        ("      if self.reload_error is not None:  # repaired back", "      if False:  # repaired back"),
    ], "tests/test_router_guard.py::test_a_repaired_shard_list_clears_the_reload_error"),
    _m("service admits every big body at once (a burst of huge texts takes every worker)",
       "retro_jax/retrieval/serve/server.py", [
        ('object.__setattr__(self, "max_buffered_bytes", self.max_body_bytes + (4 << 20))',
         'object.__setattr__(self, "max_buffered_bytes", 64 << 20)'),
    ], "tests/test_service_burst.py::test_big_texts_leave_workers_to_a_small_query"),
    _m("JSON bodies parsed whatever they hold (a 16 MiB bomb costs ~20x its size)",
       "retro_jax/retrieval/serve/handler.py", [
        ("    if values > limit:\n      brackets =", "    if False:\n      brackets ="),
    ], "tests/test_service_burst.py::test_a_json_bomb_costs_a_fraction_of_its_size"),
    _m("absolute corpus paths in /manifest and return_texts", "retro_jax/retrieval/serve/handler.py", [
        ('    if not isinstance(text, str) or not os.path.isabs(text.split(":", 1)[0]):',
         "    if True:"),
    ], "tests/test_service_burst.py::test_no_absolute_corpus_path_leaves_the_service"),
    _m("warm-up compiles one row per length only (a first burst waits for compiles)",
       "retro_jax/retrieval/serve/server.py", [
        ("    todo = [(size, length) for size in sizes for length in emb.buckets]", "    todo = []"),
    ], "tests/test_service_burst.py::test_warm_up_covers_the_batch_shapes_or_health_says_so"),
    _m("DirectRunner left to Beam (Prism download attempted)", "retro_jax/retrieval/jobs/beam.py", [
        ('runner = _classic_direct_runner(options) if standard.runner == "DirectRunner" else None',
         "runner = None"),
    ], "tests/test_beam_local.py::test_direct_runner_opens_no_socket_beyond_loopback"),
    _m("Beam workers outlive a killed driver", "retro_jax/retrieval/jobs/beam.py", [
        ('          and sys.platform.startswith("linux")):', '          and False):'),
    ], "tests/test_beam_local.py::test_workers_end_with_a_killed_driver"),
    _m("shard names may leave the database (../)", "retro_jax/retrieval/db/sharded.py", [
        ('  if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name\n',
         '  if (not isinstance(name, str) or not name\n'),
    ], "tests/test_artefact_edges.py::test_shard_names_cannot_leave_the_database"),
    _m("dropped_documents beyond the database accepted", "retro_jax/retrieval/db/sharded.py", [
        ("    if self.dropped_documents.size and (self.dropped_documents.min() < 0 or",
         "    if False and (self.dropped_documents.min() < 0 or"),
    ], "tests/test_artefact_edges.py::test_dropped_documents_out_of_range_fail_open_and_verify"),
    _m("a rerun of a finished edit_db add adds the documents again", "retro_jax/retrieval/jobs/edit.py", [
        ("  same = _same_documents(db, new)\n", "  same = None\n"),
    ], "tests/test_artefact_edges.py::test_failed_add_leaves_nothing_and_a_finished_add_is_not_repeated"),
    _m("a flag of another edit_db command is taken silently (add --how=move)",
       "retro_jax/retrieval/jobs/edit_config.py", [
        ("        if other != self.command and self.given(name):\n",
         "        if False and other != self.command and self.given(name):\n"),
    ], "tests/test_cli.py::test_a_bad_flag_value_is_one_line_and_status_1"),
    _m("a failed edit_db add keeps its half-built shard", "retro_jax/retrieval/jobs/edit.py", [
        ("  except Exception:\n    shutil.rmtree(stage, ignore_errors=True)\n    raise\n",
         "  except Exception:\n    os.replace(stage, out)\n    raise\n"),
    ], "tests/test_artefact_edges.py::test_failed_add_leaves_nothing_and_a_finished_add_is_not_repeated"),
    _m("non-UTF-8 JSON reported without its file", "retro_jax/fileio.py", [
        ("  except UnicodeDecodeError as e:\n", "  except KeyError as e:\n"),
    ], "tests/test_artefact_edges.py::test_non_utf8_shards_file_is_named"),
    _m("--max_documents ignored with an evaluation chunk store", "retro_jax/evaluation/sources.py", [
        ("    d = store.num_documents if not max_documents else", "    d = store.num_documents if True else"),
    ], "tests/test_artefact_edges.py::test_max_documents_applies_to_an_evaluation_chunk_store"),
    _m("verify silent on a missing tokenizer copy", "retro_jax/integrity.py", [
        ("      else:\n        out.append(Finding(tok_path, False, \"missing:",
         "      elif False:\n        out.append(Finding(tok_path, False, \"missing:"),
    ], "tests/test_artefact_edges.py::test_verify_names_a_missing_tokenizer_copy"),
)


@dataclasses.dataclass
class Result:
  mutation: Mutation
  status: str
  seconds: float
  detail: str = ""


def _copy_tree(dst: str) -> None:
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
  for rel in COPIED:
    shutil.copytree(os.path.join(ROOT, rel), os.path.join(dst, rel), ignore=ignore)


def apply_edits(text: str, edits) -> tuple[str, list[str]]:
  """text with every (old, new) applied once; also the old texts that were not found."""
  missing = []
  for old, new in edits:
    if old not in text:
      missing.append(old)
      continue
    text = text.replace(old, new, 1)
  return text, missing


def _pytest(copy: str, tests, timeout: float, workers: int) -> tuple[int, str]:
  env = dict(os.environ, PYTHONPATH=copy + os.pathsep + os.path.join(copy, "tests"),
             PYTHONDONTWRITEBYTECODE="1")
  cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         "--rootdir", copy, *tests]
  if workers > 1:
    cmd[4:4] = ["-n", str(workers)]
  try:
    proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True,
                          timeout=timeout)
  except subprocess.TimeoutExpired:
    return -1, "timed out"
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  return proc.returncode, (lines[-1] if lines else proc.stderr.strip()[-300:])


def run_one(mutation: Mutation | None, tests, timeout: float, workers: int) -> Result:
  t0 = time.time()
  with tempfile.TemporaryDirectory(prefix="retro_mutation_") as copy:
    _copy_tree(copy)
    if mutation is not None:
      path = os.path.join(copy, mutation.module)
      if not os.path.exists(path):
        return Result(mutation, "TARGET NOT FOUND", 0.0, f"no module {mutation.module}")
      with open(path, encoding="utf-8") as f:
        text, missing = apply_edits(f.read(), mutation.edits)
      if missing:
        return Result(mutation, "TARGET NOT FOUND", 0.0,
                      f"{mutation.module} no longer contains {missing[0]!r}")
      with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    rc, summary = _pytest(copy, tests, timeout, workers)
  status = {0: "SURVIVED", 1: "caught", 2: "caught (error)", 5: "NO TESTS"}.get(
      rc, "TIMED OUT" if rc == -1 else f"ERROR (pytest exit {rc})")
  return Result(mutation, status, time.time() - t0, summary)


def format_table(results) -> str:
  rows = [("bug", "module", "tests", "result", "s")]
  for r in results:
    m = r.mutation
    tests = ", ".join(t.replace("tests/", "") for t in m.tests)
    rows.append((m.name, m.module.replace("retro_jax/", ""), tests, r.status,
                 f"{r.seconds:.0f}"))
  lines = ["| " + " | ".join(row) + " |" for row in rows]
  lines.insert(1, "|" + "|".join("---" for _ in rows[0]) + "|")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="", help="run the bugs whose name contains this")
  parser.add_argument("--list", action="store_true", help="print the bugs and exit")
  parser.add_argument("--skip_clean", action="store_true",
                      help="do not first run the tests on an unmodified copy")
  parser.add_argument("--timeout", type=float, default=900, help="seconds per pytest run")
  parser.add_argument("--workers", type=int, default=1, help="pytest -n (needs xdist)")
  args = parser.parse_args(argv)
  chosen = [m for m in MUTATIONS if args.only.lower() in m.name.lower()]
  if not chosen:
    print(f"no bug matches --only={args.only!r}", file=sys.stderr)
    return 2
  if args.list:
    print(format_table([Result(m, "-", 0.0) for m in chosen]))
    return 0
  if not args.skip_clean:
    tests = sorted({t for m in chosen for t in m.tests})
    files = {t for t in tests if "::" not in t}
    tests = [t for t in tests if t.split("::")[0] not in files or "::" not in t]
    clean = run_one(None, tests, args.timeout, args.workers)
    print(f"unmodified copy: {clean.detail} ({clean.seconds:.0f} s)", flush=True)
    if clean.status != "SURVIVED":  # i.e. the clean tests did not all pass
      print("the tests fail without any bug: fix them first", file=sys.stderr)
      return 2
  results = []
  for m in chosen:
    r = run_one(m, m.tests, args.timeout, args.workers)
    print(f"{r.status:>16}  {m.name}  ({r.seconds:.0f} s; {r.detail})", flush=True)
    results.append(r)
  print()
  print(format_table(results))
  bad = [r for r in results if not r.status.startswith("caught")]
  print(f"\n{len(results) - len(bad)} of {len(results)} bugs caught", end="")
  print(f"; not caught: {', '.join(r.mutation.name for r in bad)}" if bad else "")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
