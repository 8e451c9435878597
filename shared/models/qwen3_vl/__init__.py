"""Qwen3-VL: DeepStack vision tower, Qwen3 language model with interleaved M-RoPE, processor."""
