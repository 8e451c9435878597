# ruff: noqa: E501  (the chat template is kept verbatim, long lines included)
"""Tiny random SmolVLM / Idefics3 checkpoints in the real layouts.

`make_smolvlm_checkpoint(out_dir, layout, model_type=...)` writes one model directory:
- "hf": transformers 5 `save_pretrained` of `SmolVLMForConditionalGeneration` (or
  `Idefics3ForConditionalGeneration`): `model.vision_model.*`, `model.connector.*`,
  `model.text_model.*`, `lm_head.*` (the Hub checkpoints use the same names);
- "mlx", "mlx-4bit", "mlx-8bit": the mlx-community layout as mlx-vlm's idefics3/smolvlm
  `sanitize` + `convert` write it: `vision_model.*` (conv weight channels-last, never
  quantized), `connector.*`, `language_model.{embed_tokens,layers,norm,lm_head}.*`;
  config.json gains `quantization`.

Tiles are `TILE` pixels square (the tower's `image_size`): 8 x 8 patches, pixel-shuffled by 2
to `IMAGE_SEQ_LEN` tokens. Images are first resized to a longest edge of `LONGEST_EDGE` (three
tiles), so a picture becomes up to 3 x 3 tiles plus the global image.
torch and transformers are imported lazily.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import mlx.core as mx

from . import mlx_convert
from .checkpoint_io import (
    check_layout,
    quantization_entries,
    randomized,
    special_only_tokenizer_json,
    special_token_ids,
    special_tokens_decoder,
    via_hf_checkpoint,
    write_json,
    write_tokenizer_files,
)
from .fixtures import MLX_LAYOUTS
from .tokenizer import BPE_VOCAB_SIZE

LAYOUTS = ("hf", "mlx", "mlx-4bit", "mlx-8bit")
MODEL_TYPES = ("smolvlm", "idefics3")
ROW_COL_TOKENS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
ADDED_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>",
    "<fake_token_around_image>", "<image>", "<global-img>", *ROW_COL_TOKENS,
]  # fmt: skip
TOKEN_IDS = special_token_ids(ADDED_TOKENS)
VOCAB_SIZE = BPE_VOCAB_SIZE + len(ADDED_TOKENS)
TILE, PATCH, SCALE = 32, 4, 2
IMAGE_SEQ_LEN = (TILE // PATCH) ** 2 // SCALE**2  # 16 tokens per tile
LONGEST_EDGE = 3 * TILE
DEFAULT_SEED = 0
EOS = TOKEN_IDS["<end_of_utterance>"]

# transformers' SmolVLM DEFAULT_CHAT_TEMPLATE (verbatim; takes string and list contents).
CHAT_TEMPLATE = "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'] is string %}{{': ' + message['content']}}{% else %}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"


def model_config(model_type: str = "smolvlm") -> dict[str, Any]:
    """The config dict the transformers config class is built from."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {MODEL_TYPES}")
    text = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB_SIZE,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "pad_token_id": TOKEN_IDS["<|endoftext|>"],
        "bos_token_id": TOKEN_IDS["<|im_start|>"],
        "eos_token_id": EOS,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": TILE,
        "patch_size": PATCH,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    }
    return {
        "image_token_id": TOKEN_IDS["<image>"],
        "scale_factor": SCALE,
        "tie_word_embeddings": False,
        "pad_token_id": TOKEN_IDS["<|endoftext|>"],
        "text_config": text,
        "vision_config": vision,
    }


def preprocessor_config(model_type: str = "smolvlm") -> dict[str, Any]:
    """preprocessor_config.json (HuggingFaceTB/SmolVLM-256M-Instruct's, at the tiny tile)."""
    name = "SmolVLM" if model_type == "smolvlm" else "Idefics3"
    return {
        "do_convert_rgb": True,
        "do_image_splitting": True,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": f"{name}ImageProcessor",
        "image_std": [0.5, 0.5, 0.5],
        "max_image_size": {"longest_edge": TILE},
        "processor_class": f"{name}Processor",
        "resample": 1,
        "rescale_factor": 0.00392156862745098,
        "size": {"longest_edge": LONGEST_EDGE},
    }


def _tokenizer_json() -> str:
    """Byte-level BPE on the shared corpus plus SmolVLM's special tokens (no BOS added)."""
    return special_only_tokenizer_json(ADDED_TOKENS)


def _tokenizer_config() -> dict[str, Any]:
    return {
        "add_bos_token": False,
        "added_tokens_decoder": special_tokens_decoder(TOKEN_IDS),
        "bos_token": "<|im_start|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<end_of_utterance>",
        "extra_special_tokens": {
            "fake_image_token": "<fake_token_around_image>",
            "image_token": "<image>",
            "end_of_utterance_token": "<end_of_utterance>",
            "global_image_token": "<global-img>",
        },
        "model_max_length": 8192,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<|endoftext|>",
    }


def write_sidecars(out_dir: Path, model_type: str = "smolvlm") -> None:
    """Tokenizer (saved by transformers 5, template in chat_template.jinja), generation and
    image-processor configs, and processor_config.json with `image_seq_len`."""
    write_tokenizer_files(out_dir, _tokenizer_json(), _tokenizer_config(), legacy=False)
    generation = {"bos_token_id": TOKEN_IDS["<|im_start|>"], "eos_token_id": EOS,
                  "pad_token_id": TOKEN_IDS["<|endoftext|>"]}  # fmt: skip
    write_json(out_dir / "generation_config.json", generation)
    write_json(out_dir / "preprocessor_config.json", preprocessor_config(model_type))
    name = "SmolVLM" if model_type == "smolvlm" else "Idefics3"
    processor = {"image_seq_len": IMAGE_SEQ_LEN, "processor_class": f"{name}Processor"}
    write_json(out_dir / "processor_config.json", processor)


def build_torch_model(model_type: str = "smolvlm", *, seed: int = DEFAULT_SEED):
    """The transformers model (fp32) with deterministic, well-spread random weights."""
    import transformers

    cfg = copy.deepcopy(model_config(model_type))
    if model_type == "smolvlm":
        config = transformers.SmolVLMConfig(**cfg)
        model_cls = transformers.SmolVLMForConditionalGeneration
    else:
        config = transformers.Idefics3Config(**cfg)
        model_cls = transformers.Idefics3ForConditionalGeneration
    return randomized(model_cls, config, seed)


def _mlx_key(key: str) -> str:
    """A transformers key -> mlx-vlm's idefics3 name (its `sanitize`: drop `model.`, then
    `text_model.` -> `language_model.`; `lm_head` goes under `language_model.`)."""
    if key.startswith("model."):
        key = key[len("model.") :]
    if key.startswith("text_model."):
        return "language_model." + key[len("text_model.") :]
    if key.startswith("lm_head."):
        return "language_model." + key
    return key


def convert_to_mlx(src: Path, dst: Path, quant: tuple[int, int] | None) -> Path:
    """What `mlx_vlm.convert` writes for these models (names above; the vision model is never
    quantized, the connector and the language model are)."""
    weights: dict[str, mx.array] = {}
    for name, w in mlx_convert._load_weights(src).items():
        key = _mlx_key(name)
        if key.endswith("patch_embedding.weight") and w.ndim == 4:
            w = w.transpose(0, 2, 3, 1)  # (D, C, P, P) -> MLX (D, P, P, C)
        weights[key] = w
    config = json.loads((src / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    if quant is not None:
        weights = mlx_convert.quantize_weights(weights, *quant)
        quantization_entries(config, quant)
    mlx_convert._save(dst, weights)
    write_json(dst / "config.json", dict(sorted(config.items())))
    for pattern in mlx_convert.SIDECAR_PATTERNS:
        for f in sorted(src.glob(pattern)):
            if f.name not in mlx_convert.SKIP_SIDECARS:
                (dst / f.name).write_bytes(f.read_bytes())
    return dst


def make_smolvlm_checkpoint(
    out_dir: Path, layout: str = "hf", *, model_type: str = "smolvlm", seed: int = DEFAULT_SEED
) -> Path:
    """Write a tiny random SmolVLM (or Idefics3) checkpoint in `layout`; return `out_dir`."""
    check_layout(layout, LAYOUTS)
    out_dir = Path(out_dir)
    if layout in MLX_LAYOUTS:
        return via_hf_checkpoint(
            lambda tmp: make_smolvlm_checkpoint(tmp, "hf", model_type=model_type, seed=seed),
            out_dir,
            lambda src, dst: convert_to_mlx(src, dst, MLX_LAYOUTS[layout]),
        )
    model = build_torch_model(model_type, seed=seed)
    model.save_pretrained(str(out_dir))
    write_sidecars(out_dir, model_type)
    return out_dir
