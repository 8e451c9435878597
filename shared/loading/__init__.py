"""Finding, reading and assembling checkpoints (local folders or the Hugging Face Hub)."""
