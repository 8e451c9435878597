"""Pieces every tiny-checkpoint fixture (`*_fixture.py`) writes the same way.

Each family fixture keeps what is its own (configs, templates, weight names); the steps below
are identical across families, so they live here once: JSON sidecars, the special-token-only
tokenizer files, random initialisation, the layout check and the MLX conversion entry points.
torch and transformers are imported lazily.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from . import mlx_convert
from .fixtures import MLX_LAYOUTS, _randomize
from .tokenizer import BPE_VOCAB_SIZE, QWEN_PATTERN, train_byte_level_bpe


def write_json(path: Path, obj: Any) -> None:
    """A sidecar JSON file as the fixtures write them (indent 2, trailing newline)."""
    path.write_text(json.dumps(obj, indent=2) + "\n")


def check_layout(layout: str, layouts: tuple[str, ...]) -> None:
    if layout not in layouts:
        raise ValueError(f"unknown layout {layout!r}; expected one of {layouts}")


def special_token_ids(tokens: list[str]) -> dict[str, int]:
    """Added tokens take the ids right after the BPE vocabulary, in order."""
    return {t: BPE_VOCAB_SIZE + i for i, t in enumerate(tokens)}


@cache
def _special_only_tokenizer_json(tokens: tuple[str, ...]) -> str:
    tok = train_byte_level_bpe(QWEN_PATTERN, nfc=False)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    return tok.to_str()


def special_only_tokenizer_json(tokens: list[str]) -> str:
    """Byte-level BPE (Qwen pre-tokenizer, no normalizer, no post-processor: the chat template
    writes any BOS) plus `tokens`, all special. Cached per token list."""
    return _special_only_tokenizer_json(tuple(tokens))


def special_tokens_decoder(token_ids: dict[str, int]) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json's `added_tokens_decoder` for tokens that are all special."""
    return {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for t, i in token_ids.items()
    }  # fmt: skip


def write_tokenizer_files(
    out_dir: Path, tokenizer_json: str, config: dict[str, Any], *, legacy: bool
) -> None:
    """tokenizer.json + tokenizer_config.json into `out_dir` (legacy=True, the Hub's
    transformers-4 files), or those round-tripped through transformers 5's AutoTokenizer
    (which writes its own files, the template in chat_template.jinja)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = out_dir if legacy else Path(tmp)
        Tokenizer.from_str(tokenizer_json).save(str(src / "tokenizer.json"), pretty=True)
        write_json(src / "tokenizer_config.json", config)
        if not legacy:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tmp).save_pretrained(str(out_dir))


def randomized(model_cls: Any, config: Any, seed: int, dtype: str = "float32") -> Any:
    """`model_cls(config)` with deterministic, well-spread random weights, in eval mode."""
    import torch

    torch.manual_seed(seed)
    model = model_cls(config)
    _randomize(model, seed)
    return model.to(getattr(torch, dtype)).eval()


def save_safetensors(state: dict[str, Any], path: Path) -> None:
    """torch tensors as one safetensors file with the `format: pt` metadata the Hub files carry."""
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={"format": "pt"})


def quantization_entries(config: dict[str, Any], quant: tuple[int, int]) -> None:
    """What mlx-vlm's convert adds to config.json for an affine (group, bits) quantization."""
    group, bits = quant
    config["quantization"] = {"group_size": group, "bits": bits, "mode": "affine"}
    config["quantization_config"] = dict(config["quantization"])


def via_hf_checkpoint(
    make_hf: Callable[[Path], Path], out_dir: Path, convert: Callable[[Path, Path], Path]
) -> Path:
    """Build an HF-layout checkpoint in a temporary directory with `make_hf`, then
    `convert(src, out_dir)` it into the MLX layout the caller asked for."""
    with tempfile.TemporaryDirectory() as tmp:
        return convert(make_hf(Path(tmp)), out_dir)


def mlx_convert_layout(layout: str) -> Callable[[Path, Path], Path]:
    """The generic `mlx_convert.convert` for an MLX layout name (group 64 when unquantized:
    the converter ignores it then)."""
    quant = MLX_LAYOUTS[layout]
    group, bits = quant or (64, 4)
    return lambda src, dst: mlx_convert.convert(
        src, dst, quantize=quant is not None, q_group_size=group, q_bits=bits
    )
