"""Qwen2.5-VL: windowed-attention vision tower; the language model is Qwen2-VL's."""
