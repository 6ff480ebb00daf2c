"""The configuration of generation (`python -m retro_jax.generate`): every default once.

The command's flags are derived from these fields (retro_jax/_cli.py).  Pure Python.
"""

from __future__ import annotations

import dataclasses

from retro_jax.options import ConfigError
from retro_jax.options import option


class GenerationError(ConfigError):
  """Bad generation input (empty prompt, bad sampling settings); names the problem."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How tokens are drawn."""
  max_new_tokens: int = option(64, "Tokens to sample per prompt.")
  temperature: float = option(1.0, "Sampling temperature (0 = greedy).")
  top_k: int = option(0, "Top-k filter (0 = off).")
  top_p: float = option(1.0, "Nucleus filter (1.0 = off).")
  seed: int = option(0, "Sampling seed.")
  stop_at_eos: bool = option(True, "Do not stop at eos.", flag="ignore_eos", negate=True)

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    if self.max_new_tokens < 1:
      raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise GenerationError(f"top_p must lie in (0, 1], got {self.top_p}")


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """Which model samples, from which prompts, retrieving from where."""
  workdir: str = option(None, "Training workdir (or checkpoints dir).", required=True)
  step: int | None = option(None, "Checkpoint step (default: latest).")
  prompt: tuple[str, ...] = option((), "Prompt text (repeat for a batch).")
  prompts_file: str | None = option(None, "File with one prompt per line.")
  db: str | None = option(None, "Database directory for live retrieval.")
  retrieval_url: str | None = option(None, "Retrieval service URL.")
  retrieval: bool = option(True, "Retrieve every chunk.", choices={"on": True, "off": False})
  tokenizer: str | None = option(None, "LM tokenizer file (default: the database's copy).")
  num_neighbors: int | None = option(None, "k per chunk (default: the model's).")
  sampling: SamplingParams = SamplingParams()
  show_neighbors: bool = option(False, "Also print the database chunk ids retrieved per "
                                "chunk.")
  service_timeout: float = option(30.0, "Retrieval service timeout (s).")
  skip_content_check: bool = option(False, "Do not recompute the recorded sha256 of the "
                                    "database files nor the checkpoint's fingerprint at "
                                    "start.")

  def __post_init__(self):
    if not self.workdir:
      raise ConfigError("workdir is required")
    if isinstance(self.prompt, str):
      object.__setattr__(self, "prompt", (self.prompt,))
    object.__setattr__(self, "prompt", tuple(self.prompt or ()))

  def prompts(self) -> list[str]:
    """--prompt texts, then the non-empty lines of --prompts_file."""
    prompts = list(self.prompt)
    if self.prompts_file:
      with open(self.prompts_file, encoding="utf-8") as f:
        prompts += [line.rstrip("\n") for line in f if line.strip()]
    return prompts
