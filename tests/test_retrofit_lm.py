"""RETRO-fitting an imported pretrained LM (retrofit.checkpoint + retrofit.inherit_decoder):
with the CCA gate closed (step 0) or retrieval off, the model is the pretrained LM exactly;
training moves only the new parameters; the database must use the LM's tokenizer."""

import flax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import fixtures_data as fx
import lm_fixtures as lf
from retro_jax import fileio
from retro_jax.inference import checkpoints
from retro_jax.model import Retro
from retro_jax.pretrained import workdir as workdir_lib
from retro_jax.training import trainer

fx.enable_compilation_cache()


def _flat(params):
  return {"/".join(p): np.asarray(v) for p, v in
          flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items()}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  root = tmp_path_factory.mktemp("lm")
  lf.hf_model(str(root / "hf"), "llama_tied", seed=11)
  wd = str(root / "wd")
  summary = workdir_lib.import_lm(str(root / "hf"), wd, chunk_size=8)
  paths = fx.build_dataset(str(root / "data"), tokenizer=summary["tokenizer"])
  return wd, paths


def _fit_config(paths, wd, **changes):
  cfg = fx.tiny_config(paths, num_steps=8, checkpoint_every=100, log_every=100, **changes)
  cfg.model.cca_gate = True
  cfg.retrofit.checkpoint = wd
  cfg.retrofit.inherit_decoder = True
  return cfg


def test_retrofitted_lm_starts_as_the_lm_and_trains_only_new_parameters(imported, tmp_path):
  wd, paths = imported
  lm = checkpoints.load_model(wd)
  cfg = _fit_config(paths, wd)
  start_out = trainer.train_and_evaluate(cfg, str(tmp_path / "fit0"), stop_after=0)
  start = start_out["state"].params
  model_cfg = trainer.inherit_decoder(cfg, trainer.train_config.model_config(cfg))
  assert model_cfg.positional == "rope" and model_cfg.tie_embeddings and model_cfg.uses_retrieval

  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 260, (2, 24))
  neighbors = rng.integers(0, 260, (2, 3, 2, 16))
  pretrained = np.asarray(Retro(lm.config).apply({"params": lm.params}, tokens, None))
  gate_closed = np.asarray(Retro(model_cfg).apply({"params": start}, tokens, neighbors))
  np.testing.assert_array_equal(gate_closed, pretrained)  # step 0 is the pretrained LM

  out = trainer.train_and_evaluate(cfg, str(tmp_path / "fit"), stop_after=3)
  end = _flat(out["state"].params)
  base = _flat(lm.params)
  for name, value in base.items():
    np.testing.assert_array_equal(end[name].view(np.uint32), value.view(np.uint32), name)
  new = sorted(set(end) - set(base))
  s0 = _flat(start)
  assert [n for n in new if np.array_equal(s0[n], end[n])] == []
  assert any("cca_gate" in n for n in new) and any(n.startswith("encoder/") for n in new)
  off = np.asarray(Retro(model_cfg).apply({"params": out["state"].params}, tokens, None))
  np.testing.assert_array_equal(off, pretrained)  # retrieval off: still the pretrained LM
  on = np.asarray(Retro(model_cfg).apply({"params": out["state"].params}, tokens, neighbors))
  assert np.abs(on - pretrained).max() > 0  # the gate opened: neighbors now reach the logits


def test_a_database_with_another_tokenizer_is_refused(imported, tmp_path):
  wd, _ = imported
  other = fx.build_dataset(str(tmp_path / "data"))  # the byte-level fixture tokenizer
  with pytest.raises(fileio.ManifestMismatchError, match="tokenizer mismatch: retrofit"):
    trainer.train_and_evaluate(_fit_config(other, wd), str(tmp_path / "fit"), stop_after=0)


def test_frozen_labels_are_the_same_with_scanned_layers():
  """retrofit_labels freeze exactly the decoder (embedding, attention, MLP, norms) and train
  the encoder and every CCA sublayer, in the per-layer and in the scan_layers layout."""
  from retro_jax import config as config_lib
  from retro_jax.training import optim
  cfg = config_lib.get_preset("tiny-llama", num_layers=6, cca_layers=(2, 4, 6), cca_gate=True)
  for c in (cfg, cfg.replace(scan_layers=True)):
    labels = {"/".join(p): v for p, v in flax.traverse_util.flatten_dict(
        flax.core.unfreeze(trainer.retrofit_labels(c, unfreeze_decoder=False))).items()}
    new = {n for n in labels if n.startswith("encoder/") or "/cca" in n}
    assert new and len(new) < len(labels)
    assert {n for n, v in labels.items() if v == optim.TRAINABLE} == new, c.scan_layers


def test_cca_layers_are_checked_against_the_lm_depth_not_the_preset(imported, tmp_path):
  # The config's own decoder has 1 layer; the imported LM has 2: CCA at layer 2 fits the LM
  # that is RETRO-fitted (the check runs after the decoder is inherited), layer 3 does not.
  wd, paths = imported
  cfg = _fit_config(paths, wd)
  cfg.model.num_layers = 1
  cfg.model.cca_layers = (2,)
  out = trainer.train_and_evaluate(cfg, str(tmp_path / "fit"), stop_after=0)
  names = " ".join(_flat(out["state"].params))
  assert "layer_1/cca_gate" in names and "layer_0/cca" not in names  # 0-based in the tree
  cfg.model.cca_layers = (3,)
  with pytest.raises(trainer.model_config_lib.ConfigError, match=r"cca_layers \[3\].*1\.\.2"):
    trainer.train_and_evaluate(cfg, str(tmp_path / "fit3"), stop_after=0)


def test_quickstart_retrofits_a_pretrained_lm_against_the_lm_itself(imported, tmp_path):
  # `retro-quickstart --lm=WORKDIR`: the database in the LM's tokenizer and chunk size, the
  # `retrofit` recipe, and the LM itself as the baseline.  With retrieval off the retrofitted
  # model is the LM exactly, so its row must equal the baseline's to the last digit.
  import glob
  import os
  import sysconfig
  from retro_jax import pipeline
  wd, _ = imported
  root = tmp_path / "corpus"
  root.mkdir()
  for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:24]:
    (root / os.path.basename(path)).write_text(open(path, encoding="utf-8").read()[:3000])
  summary = pipeline.run_quickstart(
      workdir=str(tmp_path / "work"), lm=wd, steps=3, corpus_root=str(root),
      train_bytes=40_000, eval_bytes=12_000, eval_k=[1], bert="hashing:64", eval_percent=40)
  res = summary["results"]
  assert res["RETRO, retrieval off"]["bpb"] == res["baseline"]["bpb"], res
  assert "RETRO, k=1" in summary["table"] and "r(C)" in summary["table"]
  assert summary["artifacts"]["baseline run"] == os.path.abspath(wd)
  with pytest.raises(pipeline.PipelineError, match="not a pretrained-LM workdir"):
    pipeline.run_quickstart(workdir=str(tmp_path / "w2"), lm=str(tmp_path), corpus_root=str(root))
