"""lm-evaluation-harness support: a model adapter for retro_jax workdirs (see adapter.py)."""
