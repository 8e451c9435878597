"""Hugging Face transformers as the reference implementation (tests only)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared.media.types import ProcessedPrompt

VLM_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}


def load_reference(path: Path, family: str) -> Any:
    import torch
    import transformers

    cls_name = VLM_CLASSES.get(family, "AutoModelForCausalLM")
    cls = getattr(transformers, cls_name)
    model = cls.from_pretrained(str(path), dtype=torch.float32)
    return model.eval()


def reference_inputs(
    prompt: ProcessedPrompt, ids: list[int], image_token_id: int, video_token_id: int
) -> dict[str, Any]:
    """The transformers forward() kwargs for a processed prompt extended by `ids`."""
    import torch

    input_ids = torch.tensor([ids])
    out: dict[str, Any] = {"input_ids": input_ids}
    images = [m for m in prompt.media if m.modality == "image"]
    videos = [m for m in prompt.media if m.modality == "video"]
    if images:
        out["pixel_values"] = torch.from_numpy(np.concatenate([m.pixel_values for m in images]))
        out["image_grid_thw"] = torch.tensor([m.grid_thw for m in images])
    if videos:
        out["pixel_values_videos"] = torch.from_numpy(
            np.concatenate([m.pixel_values for m in videos])
        )
        out["video_grid_thw"] = torch.tensor([m.grid_thw for m in videos])
        out["second_per_grid_ts"] = torch.tensor([m.seconds_per_grid for m in videos])
    if images or videos:
        # transformers 5 takes the modality of every token from here: 0 text, 1 image, 2 video.
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        types[input_ids == image_token_id] = 1
        types[input_ids == video_token_id] = 2
        out["mm_token_type_ids"] = types
    return out


def _media_ids(model: Any) -> tuple[int, int]:
    config = model.config
    return getattr(config, "image_token_id", -1), getattr(config, "video_token_id", -1)


def reference_logits(model: Any, prompt: ProcessedPrompt, family: str) -> np.ndarray:
    import torch

    kwargs = reference_inputs(prompt, prompt.input_ids, *_media_ids(model))
    if family != "qwen2_5_vl":
        kwargs.pop("second_per_grid_ts", None)
    with torch.no_grad():
        return model(**kwargs).logits[0].numpy()


def reference_greedy(model: Any, prompt: ProcessedPrompt, family: str, n: int) -> list[int]:
    """Greedy decoding by full re-computation each step: no cache, no generate() machinery."""
    import torch

    ids = list(prompt.input_ids)
    out: list[int] = []
    for _ in range(n):
        kwargs = reference_inputs(prompt, ids, *_media_ids(model))
        if family != "qwen2_5_vl":
            kwargs.pop("second_per_grid_ts", None)
        with torch.no_grad():
            logits = model(**kwargs).logits[0, -1]
        token = int(torch.argmax(logits))
        out.append(token)
        ids.append(token)
    return out


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Import into a parity test module to run its torch reference on one thread: the machine
    is shared, and tiny models gain nothing from threads."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
