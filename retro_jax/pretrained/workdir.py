"""A pretrained LM as a training workdir (import), and a workdir's decoder as a Hugging Face
directory (export).

An imported workdir is like one `retro_jax.train` writes, so `evaluate --retrieval=off`,
`generate` and RETRO-fitting (`--config.retrofit.checkpoint=WORKDIR`) read it unchanged:
  WORKDIR/checkpoints/0/{state: {"step", "params"}, data: {}, config: {"train", "model",
      "provenance"}}        provenance: the LM tokenizer's identity, chunk size, the source
  WORKDIR/tokenizer/tokenizer.json   the LM's own tokenizer (from the directory or the GGUF)
  WORKDIR/imported.json    where the weights came from (file, format, architecture)
The model config is a baseline (no CCA layers) with the decoder family of the checkpoint.
It has no optimizer state: train from it with retrofit.checkpoint, never with --workdir=it.
Everything is written to WORKDIR.partial-<pid> and renamed at the end, so an interrupted or
refused import leaves no directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from absl import logging
import flax
import flax.linen as nn
import jax
import numpy as np

from retro_jax import config as model_config_lib
from retro_jax import model as model_lib
from retro_jax.pretrained import hf
from retro_jax.pretrained.hf import ImportError_
from retro_jax.retrieval.store import tokenizer as tokenizer_lib
from retro_jax.training import checkpoint as checkpoint_lib
from retro_jax.training import train_config

TOKENIZER_DIR = "tokenizer"
IMPORTED = "imported.json"


def load_source(source: str, *, chunk_size: int, num_neighbors: int):
  """(RetroConfig, get(hf_name) -> array, tokenizer.json text or None, description)."""
  if not os.path.exists(source):
    raise ImportError_(f"--source {source} does not exist")
  if os.path.isfile(source):
    if not source.endswith(".gguf"):
      raise ImportError_(f"{source}: expected a Hugging Face model directory or a .gguf file")
    from retro_jax.pretrained import gguf_file  # pylint: disable=import-outside-toplevel
    g = gguf_file.GGUFModel(source, chunk_size=chunk_size, num_neighbors=num_neighbors)
    types = sorted({t.tensor_type.name for t in g.reader.tensors})
    desc = {"format": "gguf", "file": os.path.abspath(source), "architecture": g.arch,
            "tensor_types": types}
    return g.config, g.get, g.tokenizer_json, desc
  raw = hf.read_config(source)
  cfg = hf.config_from_hf(raw, os.path.join(source, "config.json"), chunk_size=chunk_size,
                          num_neighbors=num_neighbors)
  reader = hf.SafetensorsReader(source)
  tok_path = os.path.join(source, "tokenizer.json")
  tok = None
  if os.path.isfile(tok_path):
    tok = lambda: open(tok_path, encoding="utf-8").read()
  desc = {"format": "safetensors", "file": os.path.abspath(source),
          "architecture": raw.get("model_type")}
  return cfg, reader, tok, desc


def _check_shapes(cfg, params, source: str) -> None:
  want = flax.traverse_util.flatten_dict(nn.unbox(model_lib.abstract_params(cfg)))
  got = flax.traverse_util.flatten_dict(params)
  if set(want) != set(got):
    raise ImportError_(f"{source}: tensors {sorted('/'.join(p) for p in set(want) ^ set(got))[:4]}"
                       " do not match the model the config describes")
  for path, a in want.items():
    if tuple(a.shape) != tuple(np.shape(got[path])):
      raise ImportError_(f"{source}: tensor {'/'.join(path)} has shape {np.shape(got[path])}, "
                         f"the config implies {tuple(a.shape)}")


def import_lm(source: str, output: str, *, chunk_size: int = 64, num_neighbors: int = 2,
              tokenizer: str | None = None, seq_len: int = 512) -> dict[str, Any]:
  """Writes `output` (a new training workdir) from a pretrained LM; returns a summary."""
  output = os.path.abspath(output)
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    raise ImportError_(f"--output {output} already exists; choose a new directory")
  cfg, get, tok_text, desc = load_source(source, chunk_size=chunk_size,
                                         num_neighbors=num_neighbors)
  try:
    params = hf.params_from_hf(cfg, get)
  except KeyError as e:
    raise ImportError_(f"{source}: tensor {e.args[0]} is missing (an incomplete or "
                       f"different checkpoint)") from None
  _check_shapes(cfg, params, source)
  tmp = f"{output}.partial-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    tok_dir = os.path.join(tmp, TOKENIZER_DIR)
    os.makedirs(tok_dir)
    tok_file = os.path.join(tok_dir, "tokenizer.json")
    if tokenizer:
      shutil.copyfile(tokenizer, tok_file)
    elif tok_text is not None:
      with open(tok_file, "w", encoding="utf-8") as f:
        f.write(tok_text())
    else:
      raise ImportError_(f"{source} holds no tokenizer.json: pass --tokenizer=PATH to the "
                         f"LM's tokenizer.json")
    tok = tokenizer_lib.load_tokenizer(tok_file)
    if tok.vocab_size > cfg.vocab_size:
      raise ImportError_(
          f"tokenizer {tokenizer or source} has {tok.vocab_size} tokens but the weights embed "
          f"{cfg.vocab_size}: it does not belong to these weights; pass the LM's own tokenizer")
    seq = max(chunk_size, min(seq_len, cfg.max_len) // chunk_size * chunk_size)
    train = train_config.default_config()
    train.model.preset = "tiny"
    train.seq_len = seq
    train.retrieval = False
    identity = tok.identity()
    provenance = {"tokenizer": identity, "chunk_size": chunk_size, "source": output,
                  "tokenizer_file": os.path.join(TOKENIZER_DIR, "tokenizer.json"),
                  "pretrained": desc}
    saved = {"train": train_config.to_jsonable(train), "model": cfg.to_dict(),
             "provenance": provenance}
    ckpt = checkpoint_lib.Checkpointer(os.path.join(tmp, "checkpoints"), async_save=False)
    state = {"step": np.zeros((), np.int32),
             "params": jax.tree.map(np.asarray, params)}
    ckpt.save(0, state, {}, saved, force=True)
    ckpt.close()
    summary = dict(desc, workdir=output, config=cfg.to_dict(), tokenizer=identity,
                   parameters=int(sum(np.size(x) for x in jax.tree.leaves(params))))
    with open(os.path.join(tmp, IMPORTED), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=1)
    if os.path.isdir(output):
      os.rmdir(output)  # empty (checked above)
    os.rename(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info("imported %s (%s) into %s", source, desc["format"], output)
  return summary


def export_lm(workdir: str, output: str, step: int | None = None) -> dict[str, Any]:
  """Writes the decoder of a workdir as a Hugging Face directory (config.json,
  model.safetensors, tokenizer.json when the workdir has one); returns a summary."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  from retro_jax.inference import checkpoints as ckpt_lib  # pylint: disable=import-outside-toplevel
  output = os.path.abspath(output)
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    raise ImportError_(f"--output {output} already exists; choose a new directory")
  loaded = ckpt_lib.load_model(workdir, step)
  cfg = loaded.config
  hf_config = hf.config_to_hf(cfg)
  params = jax.device_get(loaded.params)
  if cfg.scan_layers:
    from retro_jax.model import params as params_lib  # pylint: disable=import-outside-toplevel
    params = params_lib.unscan_params(params, cfg)
  tensors = hf.params_to_hf(cfg, params)
  tmp = f"{output}.partial-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, hf.SINGLE_FILE), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
      json.dump(hf_config, f, indent=1)
    tok = os.path.join(loaded.workdir, TOKENIZER_DIR, "tokenizer.json")
    if os.path.isfile(tok):
      shutil.copyfile(tok, os.path.join(tmp, "tokenizer.json"))
    if os.path.isdir(output):
      os.rmdir(output)
    os.rename(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  dropped = sorted({"/".join(p[:2]) for p in flat
                    if p[0] in ("encoder", "copy") or (len(p) > 1 and p[1].startswith("cca"))})
  return {"output": output, "model_type": hf_config["model_type"], "step": loaded.step,
          "tensors": len(tensors), "not_exported": dropped}
