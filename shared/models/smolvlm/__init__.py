"""SmolVLM / Idefics3: SigLIP tiles, pixel-shuffle connector, Llama language model."""
