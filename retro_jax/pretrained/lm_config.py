"""The configurations of `python -m retro_jax.import_lm` and `python -m retro_jax.export_lm`.

Every default once; the commands' flags are derived from these fields (retro_jax/_cli.py).
Pure Python (no JAX).  The conversions: workdir.py.
"""

from __future__ import annotations

import dataclasses

from retro_jax.options import ConfigError
from retro_jax.options import option


@dataclasses.dataclass(frozen=True)
class ImportLMConfig:
  """A pretrained Llama-family LM (HF directory or .gguf) made a training workdir."""
  source: str = option(None, "HF model directory or .gguf file.", required=True)
  output: str = option(None, "New workdir to write.", required=True)
  chunk_size: int = option(64, "RETRO chunk size m recorded in the workdir.")
  num_neighbors: int = option(2, "k recorded in the model config.")
  tokenizer: str | None = option(None, "tokenizer.json to use (default: the source's own).")
  seq_len: int = option(512, "Evaluation window recorded in the workdir.")

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    if not self.source:
      raise ConfigError("source is required: --source=HF_MODEL_DIR or FILE.gguf")
    if not self.output:
      raise ConfigError("output is required: --output=WORKDIR names the workdir to write")
    for name in ("chunk_size", "num_neighbors", "seq_len"):
      if getattr(self, name) < 1:
        raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class ExportLMConfig:
  """The decoder of a workdir written as a Hugging Face model directory."""
  workdir: str = option(None, "Workdir to export.", required=True)
  output: str = option(None, "New Hugging Face directory to write.", required=True)
  step: int | None = option(None, "Checkpoint step (default: the latest).")

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    if not self.workdir:
      raise ConfigError("workdir is required: --workdir=WORKDIR names the workdir to export")
    if not self.output:
      raise ConfigError("output is required: --output=HF_DIR names the directory to write")
    if self.step is not None and self.step < 0:
      raise ConfigError(f"--step must be >= 0 (a checkpoint step), got {self.step}")
