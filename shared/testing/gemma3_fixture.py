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
import json
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from . import mlx_convert
from .fixtures import MLX_LAYOUTS, _randomize
from .tokenizer import BPE_VOCAB_SIZE, CORPUS, QWEN_PATTERN

GEMMA3_LAYOUTS = ("hf", "hf-legacy", "mlx", "mlx-4bit", "mlx-8bit")
ADDED_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
]  # fmt: skip
TOKEN_IDS = {t: BPE_VOCAB_SIZE + i for i, t in enumerate(ADDED_TOKENS)}
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


@cache
def _tokenizer_json() -> str:
    """Byte-level BPE on the shared corpus, then Gemma's special tokens (no BOS post-processor:
    the chat template writes `<bos>`)."""
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED_TOKENS])
    return tok.to_str()


def _tokenizer_config() -> dict[str, Any]:
    decoder = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for t, i in TOKEN_IDS.items()
    }  # fmt: skip
    return {
        "add_bos_token": False,
        "added_tokens_decoder": decoder,
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


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_sidecars(out_dir: Path, *, text_only: bool, legacy: bool) -> None:
    """Tokenizer (+ template), generation config and (VLM) pre-processor configs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) if not legacy else out_dir
        Tokenizer.from_str(_tokenizer_json()).save(str(src / "tokenizer.json"), pretty=True)
        _write_json(src / "tokenizer_config.json", _tokenizer_config())
        if not legacy:  # transformers 5 writes its own files (template in chat_template.jinja)
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tmp).save_pretrained(str(out_dir))
    eos = [TOKEN_IDS["<eos>"], TOKEN_IDS["<end_of_turn>"]]
    generation = {"bos_token_id": TOKEN_IDS["<bos>"], "eos_token_id": eos,
                  "pad_token_id": TOKEN_IDS["<pad>"], "transformers_version": "4.50.0.dev0"}  # fmt: skip
    _write_json(out_dir / "generation_config.json", generation)
    if not text_only:
        _write_json(out_dir / "preprocessor_config.json", preprocessor_config())
        processor = {"image_seq_length": MM_TOKENS, "processor_class": "Gemma3Processor"}
        _write_json(out_dir / "processor_config.json", processor)


def build_torch_model(*, text_only: bool = False, seed: int = DEFAULT_SEED, dtype: str = "float32"):
    """The transformers model with deterministic, well-spread random weights."""
    import torch
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
    torch.manual_seed(seed)
    model = model_cls(config)
    _randomize(model, seed)
    return model.to(getattr(torch, dtype)).eval()


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
    from safetensors.torch import save_file

    state = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    tensors = {_legacy_key(k): v.contiguous() for k, v in sorted(state.items())}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out_dir / "config.json", legacy_config(text_only, dtype))
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
    if layout not in GEMMA3_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {GEMMA3_LAYOUTS}")
    out_dir = Path(out_dir)
    if layout in MLX_LAYOUTS:
        quant = MLX_LAYOUTS[layout]
        group, bits = quant or (64, 4)
        with tempfile.TemporaryDirectory() as tmp:
            src = make_gemma3_checkpoint(
                Path(tmp), "hf-legacy", text_only=text_only, seed=seed, dtype=dtype
            )
            return mlx_convert.convert(
                src, out_dir, quantize=quant is not None, q_group_size=group, q_bits=bits
            )
    model = build_torch_model(text_only=text_only, seed=seed, dtype=dtype)
    if layout == "hf-legacy":
        _save_legacy(model, out_dir, text_only, dtype)
    else:
        model.save_pretrained(str(out_dir), save_original_format=False)
        write_sidecars(out_dir, text_only=text_only, legacy=False)
    return out_dir
