"""retro_jax: DeepMind's RETRO (Borgeaud et al. 2021, arXiv 2112.04426) in JAX/Flax."""

__version__ = "0.1.0"
