"""Gemma 3: SigLIP vision tower + pooled projector, Gemma 3 language model (image and text)."""
