"""Tiny random Qwen2-Audio checkpoints in the real on-disk layouts, for the test suite.

`make_qwen2_audio_checkpoint(out_dir, layout)` writes one model directory:
- "hf": transformers 5 `save_pretrained` (`model.audio_tower.*`, `model.multi_modal_projector.*`,
  `model.language_model.*`, `lm_head.*`), tokenizer as transformers 5 saves it;
- "hf-legacy": the names published on the Hub (`audio_tower.*`, `multi_modal_projector.*`,
  `language_model.model.*`, `language_model.lm_head.*`), chat template in
  tokenizer_config.json and chat_template.json;
- "mlx", "mlx-4bit", "mlx-8bit": the mlx-community layout (mlx-vlm naming, as for its other
  audio towers): the Hub names, Conv1d weights channels-last `(out, kernel, in)`, floating
  weights in the config's dtype; quantized layouts quantize every 2-D language-model and
  projector weight whose last dim divides by the group size (mlx-vlm skips `audio_tower`),
  with `quantization` in config.json.

The audio side is shrunk consistently: 16 mel bins, 2-second chunks (200 mel frames, 100 encoder
positions), so a clip longer than 2 s is cut as a 30 s one is on the real model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx

from . import mlx_convert
from .checkpoint_io import (
    check_layout,
    quantization_entries,
    randomized,
    via_hf_checkpoint,
    write_json,
    write_tokenizer_files,
)
from .fixtures import MLX_LAYOUTS
from .tokenizer import BPE_VOCAB_SIZE, QWEN_ADDED_TOKENS, _tokenizer_config, build_tokenizer

LAYOUTS = ("hf", "hf-legacy", "mlx", "mlx-4bit", "mlx-8bit")
AUDIO_TOKENS = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")
SAMPLING_RATE = 16000
CHUNK_SECONDS = 2
MEL_BINS = 16
AUDIO_TOKEN_ID = BPE_VOCAB_SIZE + len(QWEN_ADDED_TOKENS)  # first id after the Qwen tokens

# The template published with Qwen/Qwen2-Audio-7B-Instruct (chat_template.json).
TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def token_id(token: str) -> int:
    ids = {t: BPE_VOCAB_SIZE + i for i, (t, _) in enumerate(QWEN_ADDED_TOKENS)}
    ids.update({t: AUDIO_TOKEN_ID + i for i, t in enumerate(AUDIO_TOKENS)})
    return ids[token]


def model_config(dtype: str = "float32") -> dict[str, Any]:
    """Arguments of transformers' `Qwen2AudioConfig` for the tiny model."""
    return {
        "audio_config": {
            "num_mel_bins": MEL_BINS,
            "d_model": 32,
            "encoder_layers": 2,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "max_source_positions": CHUNK_SECONDS * SAMPLING_RATE // 160 // 2,
        },
        "text_config": {
            "model_type": "qwen2",
            "vocab_size": 448,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": False,
            "eos_token_id": token_id("<|im_end|>"),
        },
        "audio_token_id": AUDIO_TOKEN_ID,
        "dtype": dtype,
    }


def preprocessor_config() -> dict[str, Any]:
    return {
        "chunk_length": CHUNK_SECONDS,
        "dither": 0.0,
        "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": MEL_BINS,
        "hop_length": 160,
        "n_fft": 400,
        "n_samples": CHUNK_SECONDS * SAMPLING_RATE,
        "nb_max_frames": CHUNK_SECONDS * SAMPLING_RATE // 160,
        "padding_side": "right",
        "padding_value": 0.0,
        "processor_class": "Qwen2AudioProcessor",
        "return_attention_mask": True,
        "sampling_rate": SAMPLING_RATE,
    }


def generation_config() -> dict[str, Any]:
    eot = token_id("<|endoftext|>")
    return {"bos_token_id": eot, "eos_token_id": [token_id("<|im_end|>"), eot], "pad_token_id": eot}


def build_torch_model(seed: int = 0, dtype: str = "float32") -> Any:
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    config = Qwen2AudioConfig(**model_config(dtype))
    return randomized(Qwen2AudioForConditionalGeneration, config, seed, dtype)


def write_tokenizer(out_dir: Path, *, legacy: bool) -> None:
    """The Qwen test tokenizer plus Qwen2-Audio's three audio tokens (special, in id order)."""
    from tokenizers import AddedToken

    tok = build_tokenizer("qwen")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in AUDIO_TOKENS])
    cfg = _tokenizer_config("qwen", TEMPLATE)
    for i, token in enumerate(AUDIO_TOKENS):
        entry = dict(cfg["added_tokens_decoder"][str(BPE_VOCAB_SIZE)], content=token, special=True)
        cfg["added_tokens_decoder"][str(AUDIO_TOKEN_ID + i)] = entry
    cfg["additional_special_tokens"] = [*cfg["additional_special_tokens"], *AUDIO_TOKENS]
    write_tokenizer_files(out_dir, tok.to_str(), cfg, legacy=legacy)


def _write_sidecars(out_dir: Path, *, legacy: bool) -> None:
    write_tokenizer(out_dir, legacy=legacy)
    write_json(out_dir / "preprocessor_config.json", preprocessor_config())
    write_json(out_dir / "generation_config.json", generation_config())
    if legacy:
        write_json(out_dir / "chat_template.json", {"chat_template": TEMPLATE})
    else:
        (out_dir / "chat_template.jinja").write_text(TEMPLATE)


def _mlx_weights(src: Path, quant: tuple[int, int] | None) -> dict[str, mx.array]:
    weights = {}
    for key, w in mx.load(str(src / "model.safetensors")).items():
        if key.endswith(("conv1.weight", "conv2.weight")):
            w = w.transpose(0, 2, 1)  # PyTorch Conv1d (out, in, k) -> MLX (out, k, in)
        weights[key] = w
    if quant is None:
        return weights
    out: dict[str, mx.array] = {}
    for key, w in weights.items():
        if key.startswith("audio_tower.") or w.ndim != 2 or w.shape[-1] % quant[0]:
            out[key] = w
            continue
        q, scales, biases = mx.quantize(w, group_size=quant[0], bits=quant[1])
        base = key.removesuffix(".weight")
        out.update({key: q, f"{base}.scales": scales, f"{base}.biases": biases})
    return out


def _convert(src: Path, out_dir: Path, layout: str) -> Path:
    quant = MLX_LAYOUTS[layout]
    out_dir.mkdir(parents=True, exist_ok=True)
    mlx_convert._save(out_dir, _mlx_weights(src, quant))
    config = json.loads((src / "config.json").read_text())
    config = mlx_convert._mlx_config(config, generation_config(), vlm=True)
    if quant is not None:
        quantization_entries(config, quant)
    write_json(out_dir / "config.json", dict(sorted(config.items())))
    _write_sidecars(out_dir, legacy=True)
    return out_dir


def make_qwen2_audio_checkpoint(
    out_dir: Path, layout: str = "hf", *, seed: int = 0, dtype: str = "float32"
) -> Path:
    """Write a random tiny Qwen2-Audio checkpoint in `layout`; return `out_dir`."""
    check_layout(layout, LAYOUTS)
    out_dir = Path(out_dir)
    if layout in MLX_LAYOUTS:
        return via_hf_checkpoint(
            lambda tmp: make_qwen2_audio_checkpoint(tmp, "hf-legacy", seed=seed, dtype=dtype),
            out_dir,
            lambda src, dst: _convert(src, dst, layout),
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_torch_model(seed, dtype)
    # transformers 5 saves the Hub's (legacy) names by default; "hf" keeps its own.
    model.save_pretrained(str(out_dir), save_original_format=layout == "hf-legacy")
    _write_sidecars(out_dir, legacy=layout == "hf-legacy")
    return out_dir
