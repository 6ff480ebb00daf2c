"""Training batches: chunk/neighbor alignment, document handling, order, sharding, checks."""

import os
import shutil

import numpy as np
import pytest

import fixtures_data as fx
from retro_jax import fileio as manifest_lib
from retro_jax.retrieval.store import chunk_store as chunk_store_lib
from retro_jax.training import data as data_lib
from retro_jax.training import train_config
from retro_jax.training import trainer


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  return fx.build_dataset(str(tmp_path_factory.mktemp("data")))


def _open(paths, **changes):
  cfg = fx.tiny_config(paths, **changes)
  model_cfg = train_config.model_config(cfg)
  return cfg, model_cfg, trainer.open_data(cfg, model_cfg)


def test_chunk_u_gets_the_neighbors_precomputed_for_its_store_chunk(paths):
  _, model_cfg, data = _open(paths)
  store = data.train.dataset.store
  table = np.load(os.path.join(paths["neighbors_dir"], "neighbors.npy"))
  m, l, k = model_cfg.chunk_size, data.train.dataset.l, model_cfg.num_neighbors
  checked = dropped = 0
  for _ in range(3):
    batch = next(data.train)
    for b in range(batch["inputs"].shape[0]):
      window_docs = set(store.doc_ids[batch["chunk_ids"][b]].tolist())
      for u in range(l):
        c = int(batch["chunk_ids"][b, u])
        # The example's chunk u is store chunk c: its tokens ...
        want = np.asarray(store.tokens[c])
        got = batch["inputs"][b, u * m:(u + 1) * m]
        np.testing.assert_array_equal(got, np.where(want >= 0, want, 0))
        for j in range(k):
          nid = int(table[c, j])
          if nid >= 0 and store.doc_ids[nid] in window_docs:
            # ... its neighbors are row c of neighbors.npy, minus documents of the window.
            assert batch["neighbor_ids"][b, u, j] == -1
            assert (batch["neighbors"][b, u, j] == -1).all()
            dropped += 1
          else:
            assert batch["neighbor_ids"][b, u, j] == nid
            np.testing.assert_array_equal(batch["neighbors"][b, u, j],
                                          store.neighbor_tokens(np.array([nid]))[0])
            checked += 1
  assert checked > 50


def _cross_document_neighbors(paths, tmp_path):
  """A copy of the neighbors directory whose table points into the window's other documents.

  Chunk c of document d gets as neighbor 0 the first chunk of document d + 1 (in the window
  whenever the window runs from d into d + 1) and as neighbor 1 the first chunk of a far
  document (never in a window of l = 4 chunks).  The precompute job's own exclusion (same
  document as the query chunk) never removes these: only the loader's window rule can.
  """
  store = chunk_store_lib.ChunkStore.open(os.path.join(paths["db_dir"], "chunks"))
  doc_ids = np.asarray(store.doc_ids)
  offsets = np.asarray(store.doc_offsets)
  num_docs = len(offsets) - 1
  table = np.stack([offsets[(doc_ids + 1) % num_docs],
                    offsets[(doc_ids + num_docs // 2) % num_docs]], axis=1).astype(np.int64)
  out = str(tmp_path / "cross_doc_neighbors")
  shutil.copytree(paths["neighbors_dir"], out)
  old = np.load(os.path.join(out, "neighbors.npy"))
  assert old.shape == table.shape
  np.save(os.path.join(out, "neighbors.npy"), table)
  # A deliberate new table, not damage: record its hash so the content check accepts it.
  man_path = os.path.join(out, "manifest.json")
  man = manifest_lib.read_json(man_path)
  man["sha256"]["neighbors"] = manifest_lib.file_sha256(os.path.join(out, "neighbors.npy"))
  manifest_lib.atomic_write_json(man_path, man)
  return out, table


def test_neighbors_from_any_document_of_the_window_are_dropped(paths, tmp_path):
  nb_dir, table = _cross_document_neighbors(paths, tmp_path)
  _, model_cfg, data = _open(paths, **{"data.neighbors_dir": nb_dir})
  ds = data.train.dataset
  store, l, k = ds.store, ds.l, model_cfg.num_neighbors
  doc_ids = np.asarray(store.doc_ids)
  starts = np.concatenate([ds.window_starts(o) for o in range(l)])
  docs = doc_ids[starts[:, None] + np.arange(l)]
  crossing = starts[docs[:, 0] != docs[:, -1]]
  starts = np.concatenate([crossing, starts[docs[:, 0] == docs[:, -1]][:40]])
  batch = ds.batch(starts)
  dropped = kept = 0
  for b in range(len(starts)):
    window_docs = set(doc_ids[batch["chunk_ids"][b]].tolist())
    for u in range(l):
      c = int(batch["chunk_ids"][b, u])
      for j in range(k):
        nid = int(table[c, j])
        if doc_ids[nid] in window_docs:
          assert batch["neighbor_ids"][b, u, j] == -1, (b, u, j)
          assert (batch["neighbors"][b, u, j] == -1).all()
          dropped += 1
        else:
          assert batch["neighbor_ids"][b, u, j] == nid, (b, u, j)
          np.testing.assert_array_equal(batch["neighbors"][b, u, j],
                                        store.neighbor_tokens(np.array([nid]))[0])
          kept += 1
  # Every window that crosses into the next document loses neighbor 0 of its earlier
  # chunks; far documents are kept.
  assert dropped >= len(crossing) > 10
  assert kept > dropped
  # A held-out split (database != query store) drops nothing by window.
  held_out = data_lib.WindowDataset(store, ds.seq_len, ds.vocab_size, data_lib.Retrieval(
      ds.neighbors, k, database=store, same_store=False))
  np.testing.assert_array_equal(held_out.batch(crossing)["neighbor_ids"],
                                table[crossing[:, None] + np.arange(l)][:, :, :k])


def test_targets_are_the_next_token_and_padding_is_not_scored(paths):
  _, model_cfg, data = _open(paths)
  store = data.train.dataset.store
  m, l = model_cfg.chunk_size, data.train.dataset.l
  batches = []  # until one holds padding (24 of the 3414 fixture chunks do), within an epoch
  while not any((b["weights"] == 0).any() for b in batches[-1:]) and len(batches) < 100:
    batches.append(next(data.train))
  for batch in batches:
    for b in range(batch["inputs"].shape[0]):
      c0 = int(batch["chunk_ids"][b, 0])
      raw = np.asarray(store.tokens[c0:c0 + l + 1]).reshape(-1)[: l * m + 1]
      np.testing.assert_array_equal(batch["targets"][b], np.where(raw[1:] >= 0, raw[1:], 0))
      # The last position's target is the first token of the next store chunk.
      assert batch["targets"][b, -1] == max(int(store.tokens[c0 + l, 0]), 0)
      np.testing.assert_array_equal(batch["weights"][b], (raw[:-1] >= 0) & (raw[1:] >= 0))
  # Windows can cross a document end only after its eos: padding exists and is unscored.
  assert any((batch["weights"] == 0).any() for batch in batches)


def test_windows_cross_documents_only_after_an_eos(paths):
  _, model_cfg, data = _open(paths)
  store = data.train.dataset.store
  for _ in range(4):
    batch = next(data.train)
    docs = store.doc_ids[batch["chunk_ids"]]  # [B, l]
    for b, u in zip(*np.nonzero(np.diff(docs, axis=1))):
      last = np.asarray(store.tokens[batch["chunk_ids"][b, u]])
      assert fx.EOS in last.tolist()


def test_order_is_deterministic_covers_each_window_once_and_changes_per_epoch(paths):
  _, _, data = _open(paths)
  it = data.train
  per_epoch = len(it._starts(0)) // it.global_batch_size
  first = [next(it)["chunk_ids"][:, 0] for _ in range(per_epoch)]
  seen = np.concatenate(first)
  assert len(set(seen.tolist())) == len(seen)  # no window twice in an epoch
  assert len(set((seen % it.dataset.l).tolist())) == 1  # one chunk offset per epoch
  second = next(it)["chunk_ids"][:, 0]
  assert it.epoch == 1
  assert not np.array_equal(second, first[0])
  _, _, again = _open(paths)
  np.testing.assert_array_equal(next(again.train)["chunk_ids"], np.asarray(
      [first[0]]).T + np.arange(it.dataset.l))


def test_state_round_trip_resumes_the_same_batches(paths):
  _, _, data = _open(paths)
  for _ in range(5):
    next(data.train)
  state = data.train.get_state()
  expected = [next(data.train)["chunk_ids"] for _ in range(3)]
  _, _, fresh = _open(paths)
  fresh.train.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(fresh.train)["chunk_ids"], want)
  with pytest.raises(data_lib.DataError, match="seed=123"):
    fresh.train.set_state(dict(state, seed=123))


def test_process_shards_concatenate_to_the_global_batch(paths):
  _, _, one = _open(paths)
  cfg, model_cfg, _ = _open(paths)
  parts = [trainer.open_data(cfg, model_cfg, p, 2).train for p in range(2)]
  for _ in range(3):
    full = next(one.train)
    halves = [next(p) for p in parts]
    for key in full:
      np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), full[key])


def _copy_store(src, dst, edit_manifest=None, edit_tokens=None):
  shutil.copytree(src, dst)
  if edit_tokens is not None:
    tokens = np.load(os.path.join(dst, "tokens.npy"))
    np.save(os.path.join(dst, "tokens.npy"), edit_tokens(tokens))
  if edit_manifest is not None:
    man = manifest_lib.read_manifest(dst)
    edit_manifest(man)
    manifest_lib.atomic_write_json(os.path.join(dst, "manifest.json"), man)
  return dst


def test_chunk_size_mismatch_names_both_values(paths):
  with pytest.raises(manifest_lib.ManifestMismatchError, match=r"chunk size.* 16 .* 8"):
    _open(paths, **{"model.chunk_size": 16})


def test_vocabulary_mismatch_names_both_values(paths):
  with pytest.raises(manifest_lib.ManifestMismatchError,
                     match=r"vocab_size 200 .*vocab_size 260"):
    _open(paths, **{"model.vocab_size": 200})


def test_neighbor_count_mismatch_names_both_values(paths):
  with pytest.raises(manifest_lib.ManifestMismatchError,
                     match=r"num_neighbors 3 .* k 2"):
    _open(paths, **{"model.num_neighbors": 3})


def test_missing_neighbors_file_says_which_command_builds_it(paths, tmp_path):
  with pytest.raises(data_lib.DataError,
                     match=r"not found.*python -m retro_jax.precompute_neighbors"):
    _open(paths, **{"data.neighbors_dir": str(tmp_path / "nowhere")})


def test_neighbors_of_another_store_are_refused(paths, tmp_path):
  with pytest.raises(manifest_lib.ManifestMismatchError, match="query chunk store"):
    _open(paths, **{"data.neighbors_dir": paths["eval_neighbors_dir"]})


def test_token_ids_beyond_the_vocabulary_are_rejected_where_data_enters(paths, tmp_path):
  def corrupt(tokens):
    tokens = tokens.copy()
    tokens[tokens >= 4] = np.minimum(tokens[tokens >= 4] + 500, 1000)
    return tokens
  store_dir = _copy_store(os.path.join(paths["db_dir"], "chunks"), str(tmp_path / "bad"),
                          edit_tokens=corrupt)
  store = chunk_store_lib.ChunkStore.open(store_dir)
  ds = data_lib.WindowDataset(store, 32, fx.VOCAB)
  with pytest.raises(data_lib.DataError, match=r"token id \d+ outside \[0, vocab_size=260\)"):
    ds.batch(np.array([0, 4]))


def test_baseline_reads_no_neighbors(paths):
  _, _, data = _open(paths, retrieval=False, **{"data.neighbors_dir": ""})
  batch = next(data.train)
  assert "neighbors" not in batch


def test_bytes_per_token_of_byte_level_text_is_about_one(paths):
  _, _, data = _open(paths)
  # Byte-level ids: one token per byte, plus one eos per document.
  assert 0.95 < data.eval_bytes_per_token <= 1.0
