"""The model families the test fixtures cover: architectures, head tying, tokenizer style."""

from __future__ import annotations

from .tokenizer import special_token_ids

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen2", "qwen3", "llama")
VLM_FAMILIES = ("qwen2_vl", "qwen2_5_vl")

ARCHITECTURES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
}
# Which published model each family's tying mirrors: Qwen2-VL-2B, Qwen2.5-VL-7B, Qwen2.5-7B,
# Qwen3-0.6B, Llama-3.2-1B. Both tied and untied heads are thus exercised.
TIED = {"qwen2_vl": True, "qwen2_5_vl": False, "qwen2": False, "qwen3": True, "llama": True}


def tokenizer_style(family: str) -> str:
    _check_family(family)
    return "llama3" if family == "llama" else "qwen"


def token_ids(family: str) -> dict[str, int]:
    """Content -> id of every added token in the family's tokenizer."""
    return special_token_ids(tokenizer_style(family))


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
