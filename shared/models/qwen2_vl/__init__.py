"""Qwen2-VL: vision tower, Qwen2 language model with M-RoPE, processor."""
