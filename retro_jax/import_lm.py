r"""Import a pretrained Llama-family LM as a retro_jax training workdir.

  python -m retro_jax.import_lm --source=HF_MODEL_DIR_OR_FILE.gguf --output=WORKDIR \
      [--chunk_size=64] [--tokenizer=tokenizer.json] [--seq_len=512]

--source: a Hugging Face model directory (config.json + model.safetensors, or shards listed
by model.safetensors.index.json; llama / mistral / qwen2 / SmolLM2 / gpt2) or a .gguf file (llama,
qwen2; every tensor dequantized to float32, the tokenizer taken from the file).  WORKDIR
then serves `evaluate --workdir=WORKDIR --retrieval=off`, `generate`, and RETRO-fitting
(`train --config.retrofit.checkpoint=WORKDIR --config.retrofit.inherit_decoder=True`); the
LM's tokenizer is WORKDIR/tokenizer/tokenizer.json (build databases with it).  Nothing from
the checkpoint is executed.  See retro_jax/pretrained/workdir.py.
"""

from retro_jax import _cli
from retro_jax.pretrained import lm_config

_CONFIG = _cli.define_flags(lm_config.ImportLMConfig)


def main(argv):
  del argv
  config = _CONFIG()
  from retro_jax.pretrained import workdir  # pylint: disable=g-import-not-at-top
  s = workdir.import_lm(config.source, config.output, chunk_size=config.chunk_size,
                        num_neighbors=config.num_neighbors, tokenizer=config.tokenizer,
                        seq_len=config.seq_len)
  c = s["config"]
  print(f"imported {s['format']} {s['architecture']} ({s['parameters']:,} parameters, "
        f"{c['num_layers']} layers, d={c['emb_dim']}, vocab {c['vocab_size']}) into "
        f"{s['workdir']}")


if __name__ == "__main__":
  _cli.run(main, "import_lm")
