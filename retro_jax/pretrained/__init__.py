"""Pretrained LMs in and out: Hugging Face safetensors and GGUF (import), HF (export)."""
