r"""Export the decoder of a retro_jax workdir as a Hugging Face model directory.

  python -m retro_jax.export_lm --workdir=WORKDIR --output=HF_DIR [--step=N]

Writes config.json (LlamaForCausalLM, or Qwen2ForCausalLM for qkv-only biases),
model.safetensors (float32) and the workdir's tokenizer.json; transformers'
`AutoModelForCausalLM.from_pretrained(HF_DIR)` loads it.  Only Llama-family decoders
(rope, SwiGLU, RMSNorm) are exported; a RETRO model's encoder and CCA are left out.
"""

from retro_jax import _cli
from retro_jax.pretrained import lm_config

_CONFIG = _cli.define_flags(lm_config.ExportLMConfig)


def main(argv):
  del argv
  config = _CONFIG()
  from retro_jax.pretrained import workdir  # pylint: disable=g-import-not-at-top
  s = workdir.export_lm(config.workdir, config.output, config.step)
  print(f"exported step {s['step']} as {s['model_type']} ({s['tensors']} tensors) to "
        f"{s['output']}")


if __name__ == "__main__":
  _cli.run(main, "export_lm")
