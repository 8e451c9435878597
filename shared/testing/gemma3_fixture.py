# ruff: noqa: E501  (the chat template is kept verbatim, long lines included)
"""Tiny random Gemma 3 checkpoints (`gemma3` image+text, `gemma3_text`) in the real layouts.

`make_gemma3_checkpoint(out_dir, layout, text_only=...)` writes one model directory:
- "hf": transformers 5 `save_pretrained` (`model.vision_tower.*`, `model.multi_modal_projector.*`,
  `model.language_model.*`; tokenizer round-tripped through AutoTokenizer);
- "hf-legacy": as google/gemma-3-*-it is published (transformers-4 names `vision_tower.*`,
  `multi_modal_projector.*`, `language_model.model.*`, a Hub-style config.json with
  `rope_scaling` / `rope_local_base_freq` / `sliding_window_pattern`);
- "mlx", "mlx-4bit", "mlx-8bit": the mlx-community layout via `mlx_convert` from "hf-legacy".

The text model is small but keeps what makes Gemma 3 Gemma 3: sliding layers interleaved with
a global one (window `SLIDING_WINDOW` is shorter than the test prompts and than an image's
`MM_TOKENS` tokens), linear rope scaling on the global layers, query_pre_attn_scalar != head_dim.
The text-only model also soft-caps its logits (transformers applies that in Gemma3ForCausalLM).
torch and transformers are imported lazily.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from .checkpoint_io import (
    check_layout,
    mlx_convert_layout,
    randomized,
    save_safetensors,
    special_only_tokenizer_json,
    special_token_ids,
    special_tokens_decoder,
    via_hf_checkpoint,
    write_json,
    write_tokenizer_files,
)
from .fixtures import MLX_LAYOUTS
from .tokenizer import BPE_VOCAB_SIZE

GEMMA3_LAYOUTS = ("hf", "hf-legacy", "mlx", "mlx-4bit", "mlx-8bit")
ADDED_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
]  # fmt: skip
TOKEN_IDS = special_token_ids(ADDED_TOKENS)
VOCAB_SIZE = BPE_VOCAB_SIZE + len(ADDED_TOKENS)
MM_TOKENS = 16  # 4 x 4 pooled tokens per image
IMAGE_SIZE, PATCH = 32, 4  # an 8 x 8 patch grid, pooled by 2
SLIDING_WINDOW = 12
TEXT_LAYERS = 3  # sliding, global, sliding (sliding_window_pattern 2)
# With seed 2 the tests' greedy continuations vary (no single repeated token) and every step's
# top-2 logit margin is > 0.05, so token equality means something.
DEFAULT_SEED = 2

# google/gemma-3-4b-it chat_template (verbatim).
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


def text_config(text_only: bool) -> dict[str, Any]:
    cfg = {
        "head_dim": 16,
        "hidden_size": 64,
        "intermediate_size": 128,
        "max_position_embeddings": 4096,
        "model_type": "gemma3_text",
        "num_attention_heads": 4,
        "num_hidden_layers": TEXT_LAYERS,
        "num_key_value_heads": 2,
        "query_pre_attn_scalar": 24,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "rope_theta": 1000000.0,
        "sliding_window": SLIDING_WINDOW,
        "sliding_window_pattern": 2,
        "vocab_size": VOCAB_SIZE,
        "bos_token_id": TOKEN_IDS["<bos>"],
        "eos_token_id": [TOKEN_IDS["<eos>"], TOKEN_IDS["<end_of_turn>"]],
        "pad_token_id": TOKEN_IDS["<pad>"],
    }
    if text_only:
        cfg["final_logit_softcapping"] = 30.0
    return cfg


def legacy_config(text_only: bool = False, dtype: str = "float32") -> dict[str, Any]:
    """config.json as the Hub publishes it (transformers-4 style)."""
    if text_only:
        cfg = {**text_config(True), "architectures": ["Gemma3ForCausalLM"]}
    else:
        cfg = {
            "architectures": ["Gemma3ForConditionalGeneration"],
            "boi_token_index": TOKEN_IDS["<start_of_image>"],
            "eoi_token_index": TOKEN_IDS["<end_of_image>"],
            "eos_token_id": [TOKEN_IDS["<eos>"], TOKEN_IDS["<end_of_turn>"]],
            "image_token_index": TOKEN_IDS["<image_soft_token>"],
            "initializer_range": 0.02,
            "mm_tokens_per_image": MM_TOKENS,
            "model_type": "gemma3",
            "text_config": text_config(False),
            "vision_config": {
                "hidden_size": 32,
                "image_size": IMAGE_SIZE,
                "intermediate_size": 64,
                "model_type": "siglip_vision_model",
                "num_attention_heads": 2,
                "num_hidden_layers": 2,
                "patch_size": PATCH,
                "vision_use_head": False,
            },
        }
    cfg.update({"torch_dtype": dtype, "transformers_version": "4.50.0.dev0"})
    return dict(sorted(cfg.items()))


def preprocessor_config() -> dict[str, Any]:
    """preprocessor_config.json (google/gemma-3-4b-it's, at the tiny image size)."""
    return {
        "do_convert_rgb": None,
        "do_normalize": True,
        "do_pan_and_scan": None,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "Gemma3ImageProcessor",
        "image_seq_length": MM_TOKENS,
        "image_std": [0.5, 0.5, 0.5],
        "pan_and_scan_max_num_crops": None,
        "pan_and_scan_min_crop_size": None,
        "pan_and_scan_min_ratio_to_activate": None,
        "processor_class": "Gemma3Processor",
        "resample": 2,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    }


def _tokenizer_json() -> str:
    """Byte-level BPE on the shared corpus, then Gemma's special tokens (no BOS post-processor:
    the chat template writes `<bos>`)."""
    return special_only_tokenizer_json(ADDED_TOKENS)


def _tokenizer_config() -> dict[str, Any]:
    return {
        "add_bos_token": False,
        "added_tokens_decoder": special_tokens_decoder(TOKEN_IDS),
        "bos_token": "<bos>",
        "chat_template": GEMMA3_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "extra_special_tokens": {
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        "model_max_length": 4096,
        "pad_token": "<pad>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    }


def write_sidecars(out_dir: Path, *, text_only: bool, legacy: bool) -> None:
    """Tokenizer (+ template), generation config and (VLM) pre-processor configs."""
    write_tokenizer_files(out_dir, _tokenizer_json(), _tokenizer_config(), legacy=legacy)
    eos = [TOKEN_IDS["<eos>"], TOKEN_IDS["<end_of_turn>"]]
    generation = {"bos_token_id": TOKEN_IDS["<bos>"], "eos_token_id": eos,
                  "pad_token_id": TOKEN_IDS["<pad>"], "transformers_version": "4.50.0.dev0"}  # fmt: skip
    write_json(out_dir / "generation_config.json", generation)
    if not text_only:
        write_json(out_dir / "preprocessor_config.json", preprocessor_config())
        processor = {"image_seq_length": MM_TOKENS, "processor_class": "Gemma3Processor"}
        write_json(out_dir / "processor_config.json", processor)


def build_torch_model(*, text_only: bool = False, seed: int = DEFAULT_SEED, dtype: str = "float32"):
    """The transformers model with deterministic, well-spread random weights."""
    import transformers

    cfg = copy.deepcopy(legacy_config(text_only, dtype))
    for key in ("architectures", "transformers_version", "torch_dtype"):
        cfg.pop(key)
    if text_only:
        model_cls, config = transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(**cfg)
    else:
        model_cls, config = (
            transformers.Gemma3ForConditionalGeneration,
            transformers.Gemma3Config(**cfg),
        )
    return randomized(model_cls, config, seed, dtype)


def _legacy_key(key: str) -> str:
    """transformers-5 state-dict key -> the published (transformers-4) key."""
    for new, old in (
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
    ):
        if key.startswith(new):
            return old + key[len(new) :]
    return key


def _save_legacy(model, out_dir: Path, text_only: bool, dtype: str) -> None:
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    tensors = {_legacy_key(k): v.contiguous() for k, v in sorted(state.items())}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, out_dir / "model.safetensors")
    write_json(out_dir / "config.json", legacy_config(text_only, dtype))
    write_sidecars(out_dir, text_only=text_only, legacy=True)


def make_gemma3_checkpoint(
    out_dir: Path,
    layout: str = "hf",
    *,
    text_only: bool = False,
    seed: int = DEFAULT_SEED,
    dtype: str = "float32",
) -> Path:
    """Write a tiny random Gemma 3 checkpoint in `layout`; return `out_dir`."""
    check_layout(layout, GEMMA3_LAYOUTS)
    out_dir = Path(out_dir)
    if layout in MLX_LAYOUTS:
        return via_hf_checkpoint(
            lambda tmp: make_gemma3_checkpoint(
                tmp, "hf-legacy", text_only=text_only, seed=seed, dtype=dtype
            ),
            out_dir,
            mlx_convert_layout(layout),
        )
    model = build_torch_model(text_only=text_only, seed=seed, dtype=dtype)
    if layout == "hf-legacy":
        _save_legacy(model, out_dir, text_only, dtype)
    else:
        model.save_pretrained(str(out_dir), save_original_format=False)
        write_sidecars(out_dir, text_only=text_only, legacy=False)
    return out_dir
