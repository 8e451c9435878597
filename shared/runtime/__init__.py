"""The in-process runtime: loaded models, sampling, and the generation loop."""
