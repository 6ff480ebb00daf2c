"""The configuration of `python -m retro_jax.import_megatron`: a legacy Megatron RETRO
checkpoint converted into a retro_jax workdir.

Every default once; the command's flags are derived from these fields (retro_jax/_cli.py).
Pure Python (no JAX, no torch).  The conversion: convert.py.
"""

from __future__ import annotations

import dataclasses
import math

from retro_jax.options import ConfigError
from retro_jax.options import option


@dataclasses.dataclass(frozen=True)
class MegatronImportConfig:
  """Which checkpoint, written where, with what the checkpoint may not record."""
  checkpoint: str = option(None, "The Megatron checkpoint directory (with "
                           "latest_checkpointed_iteration.txt).", required=True)
  output: str = option(None, "The retro_jax workdir to create.", required=True)
  tokenizer: str | None = option(None, "The model's SentencePiece (or Hugging Face) "
                                 "tokenizer, copied into the workdir and recorded.")
  chunk_size: int | None = option(None, "RETRO chunk length m, when the checkpoint's args do "
                                  "not record it.")
  cca_scale: float | None = option(None, "The constant CCA scale (Megatron's "
                                   "retro_attention_gate); default: the checkpoint's.")

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    if not self.checkpoint:
      raise ConfigError("checkpoint is required: --checkpoint=DIR names the Megatron "
                        "checkpoint")
    if not self.output:
      raise ConfigError("output is required: --output=WORKDIR names the workdir to create")
    if self.chunk_size is not None and self.chunk_size < 1:
      raise ConfigError(f"--chunk_size must be >= 1, got {self.chunk_size}")
    if self.cca_scale is not None and not math.isfinite(self.cca_scale):
      raise ConfigError(f"--cca_scale must be a finite number, got {self.cca_scale}")
