r"""Import a pretrained Llama-family LM as a retro_jax training workdir.

  python -m retro_jax.import_lm --source=HF_MODEL_DIR_OR_FILE.gguf --output=WORKDIR \
      [--chunk_size=64] [--tokenizer=tokenizer.json] [--seq_len=512]

--source: a Hugging Face model directory (config.json + model.safetensors, or shards listed
by model.safetensors.index.json; llama / mistral / qwen2 / SmolLM2) or a .gguf file (llama,
qwen2; every tensor dequantized to float32, the tokenizer taken from the file).  WORKDIR
then serves `evaluate --workdir=WORKDIR --retrieval=off`, `generate`, and RETRO-fitting
(`train --config.retrofit.checkpoint=WORKDIR --config.retrofit.inherit_decoder=True`); the
LM's tokenizer is WORKDIR/tokenizer/tokenizer.json (build databases with it).  Nothing from
the checkpoint is executed.  See retro_jax/pretrained/workdir.py.
"""

from absl import flags

from retro_jax import _cli

_SOURCE = flags.DEFINE_string("source", None, "HF model directory or .gguf file.")
_OUTPUT = flags.DEFINE_string("output", None, "New workdir to write.")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "RETRO chunk size m recorded in the workdir.")
_NEIGHBORS = flags.DEFINE_integer("num_neighbors", 2, "k recorded in the model config.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                 "tokenizer.json to use (default: the source's own).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Evaluation window recorded in the workdir.")
flags.mark_flags_as_required(["source", "output"])


def main(argv):
  del argv
  from retro_jax.pretrained import workdir  # pylint: disable=g-import-not-at-top
  s = workdir.import_lm(_SOURCE.value, _OUTPUT.value, chunk_size=_CHUNK.value,
                        num_neighbors=_NEIGHBORS.value, tokenizer=_TOKENIZER.value,
                        seq_len=_SEQ_LEN.value)
  c = s["config"]
  print(f"imported {s['format']} {s['architecture']} ({s['parameters']:,} parameters, "
        f"{c['num_layers']} layers, d={c['emb_dim']}, vocab {c['vocab_size']}) into "
        f"{s['workdir']}")


if __name__ == "__main__":
  _cli.run(main, "import_lm")
