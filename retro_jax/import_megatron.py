r"""Convert NVIDIA's Megatron RETRO checkpoints (retro-8b / retro-48b) to a retro_jax workdir.

  python -m retro_jax.import_megatron --checkpoint=DIR --output=WORKDIR \
      [--tokenizer=mt_nlg_plus_multilingual_ja_zh_the_stack_frac_015_256k.model] \
      [--chunk_size=64] [--cca_scale=0]

DIR holds latest_checkpointed_iteration.txt and release/mp_rank_XX/model_optim_rng.pt (the
legacy tensor-parallel layout of the released checkpoints).  The architecture comes from the
`args` saved in the checkpoint; --chunk_size is needed only when they do not record it (the
InstructRetro-era runs kept it elsewhere: 64 for every released model).  --cca_scale
overrides the run's retro_attention_gate (NVIDIA's instruction tuning and generation used 0).
Nothing but tensors, plain containers and the argument namespace is unpickled; torch is not
needed.  Details: retro_jax/megatron/.
"""

from retro_jax import _cli
from retro_jax.megatron import convert_config

_CONFIG = _cli.define_flags(convert_config.MegatronImportConfig)


def main(argv):
  del argv
  config = _CONFIG()
  from retro_jax.megatron import convert  # pylint: disable=g-import-not-at-top  (after the malloc restart)
  summary = convert.convert(config.checkpoint, config.output, tokenizer=config.tokenizer,
                            chunk_size=config.chunk_size, cca_scale=config.cca_scale)
  arch = summary["arch"]
  print(f"import_megatron: {summary['output']}: {summary['num_params']:,} parameters, "
        f"{arch['num_layers']} layers x {arch['hidden_size']}, CCA at "
        f"{list(convert.legacy.MegatronArch(**arch).cca_layers)}, from "
        f"{arch['tensor_parallel']} tensor-parallel shards")


if __name__ == "__main__":
  _cli.run(main, "import_megatron", errors=["retro_jax.megatron.torch_pickle.CheckpointFileError",
                                            "retro_jax.megatron.legacy.ArchitectureError"])
