r"""Export the decoder of a retro_jax workdir as a Hugging Face model directory.

  python -m retro_jax.export_lm --workdir=WORKDIR --output=HF_DIR [--step=N]

Writes config.json (LlamaForCausalLM, or Qwen2ForCausalLM for qkv-only biases),
model.safetensors (float32) and the workdir's tokenizer.json; transformers'
`AutoModelForCausalLM.from_pretrained(HF_DIR)` loads it.  Only Llama-family decoders
(rope, SwiGLU, RMSNorm) are exported; a RETRO model's encoder and CCA are left out.
"""

from absl import flags

from retro_jax import _cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir to export.")
_OUTPUT = flags.DEFINE_string("output", None, "New Hugging Face directory to write.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.mark_flags_as_required(["workdir", "output"])


def main(argv):
  del argv
  from retro_jax.pretrained import workdir  # pylint: disable=g-import-not-at-top
  s = workdir.export_lm(_WORKDIR.value, _OUTPUT.value, _STEP.value)
  print(f"exported step {s['step']} as {s['model_type']} ({s['tensors']} tensors) to "
        f"{s['output']}")


if __name__ == "__main__":
  _cli.run(main, "export_lm")
