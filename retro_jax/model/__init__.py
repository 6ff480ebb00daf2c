"""The RETRO network: decoder, neighbor encoder and chunked cross-attention (Flax Linen)."""

from retro_jax.model.params import abstract_params, count_params, dummy_inputs, init_params
from retro_jax.model.retro import DecoderLayer, Retro

__all__ = ["Retro", "DecoderLayer", "count_params", "init_params", "abstract_params",
           "dummy_inputs"]
