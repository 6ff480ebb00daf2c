"""Sampling from RETRO with a KV cache and live retrieval every completed chunk."""
