"""NVIDIA's Megatron RETRO checkpoints (retro-8b / retro-48b, legacy tensor-parallel format).

torch_pickle: a torch-free, memory-mapped reader of `torch.save` zip files that builds only
tensors, plain containers and argparse.Namespace.  legacy: the checkpoint layout, the
architecture read from the saved `args`, and the tensor-parallel merge to megatron-core
names.  The command is `python -m retro_jax.import_megatron`.
"""
