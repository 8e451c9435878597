"""Qwen2-Audio: Whisper-style audio encoder + linear projector + Qwen2 language model."""
