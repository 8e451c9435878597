"""Our side of the VLM parity tests (Gemma 3, SmolVLM): logits and greedy tokens from the MLX
model, and the checks every family runs the same way on its quantized and split checkpoints.
Each test keeps its own transformers side (processors and forward kwargs differ by family)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from shared.api import load
from shared.media.types import ProcessedPrompt
from shared.runtime.generate import encode_media, prepare_inputs, stream_generate
from shared.runtime.sampling import SamplingParams
from tests.reference import rel_err

N_TOKENS = 32


def our_logits(model: Any, prompt: ProcessedPrompt) -> np.ndarray:
    """Prefill logits of the whole prompt in one step (LM extras passed as the runtime does;
    families without extras have none)."""
    inputs = prepare_inputs(model, prompt, encode_media(model, prompt.media))
    logits = model.language(
        inputs.input_ids,
        model.language.make_cache(),
        input_embeddings=inputs.input_embeddings,
        **inputs.extras,
    )
    return np.array(logits[0].astype(mx.float32))


def our_greedy(model: Any, prompt: ProcessedPrompt, n: int = N_TOKENS) -> list[int]:
    model = dataclasses.replace(model, eos_token_ids=frozenset())  # always n tokens
    return [
        c.token for c in stream_generate(model, prompt, max_tokens=n, sampling=SamplingParams())
    ]


def assert_matches_dequantized(q: Any, d: Any, prompt: ProcessedPrompt, tol: float) -> None:
    """A quantized model `q` against `d`, the same checkpoint with its layers dequantized:
    logits within `tol` and the same 16 greedy tokens."""
    err = rel_err(our_logits(q, prompt), our_logits(d, prompt))
    assert err <= tol, f"quantized vs dequantized logits relative error {err:.2e}"
    assert our_greedy(q, prompt, 16) == our_greedy(d, prompt, 16)


def split_loaded_names(path: Path) -> tuple[list[str], list[str]]:
    """Parameter names of the vision half and of the language half, each loaded alone (the
    other half must then be absent)."""
    from mlx.utils import tree_flatten

    vision, language = load(path, components=["vision"]), load(path, components=["language"])
    assert vision.language is None and language.vision is None
    return (
        [k for k, _ in tree_flatten(vision.vision.parameters())],
        [k for k, _ in tree_flatten(language.language.parameters())],
    )
