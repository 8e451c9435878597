"""The tiny checkpoint generator: formats, tokenizer, templates, and cross-layout consistency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from shared.testing import FAMILIES, LAYOUTS, VLM_FAMILIES, make_checkpoint, token_ids
from shared.testing.fixtures import MAX_PIXELS, MLX_LAYOUTS, TIED, tokenizer_style
from shared.testing.tokenizer import BPE_VOCAB_SIZE, _trained_json, build_tokenizer, vocab_size

TEXT = "Hello, world! The picture shows 2024 cats.\n  It's   a test: café, naïve — done."
REPO = Path(__file__).resolve().parents[1]
VISION_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _text_config(cfg: dict) -> dict:
    return cfg.get("text_config", cfg)


def _expected_prefixes(family: str, layout: str) -> set[str]:
    if family not in VLM_FAMILIES:
        return {"model", "lm_head"} if not TIED[family] else {"model"}
    head = set() if TIED[family] else {"lm_head"}
    if layout == "hf":
        return {"model.visual", "model.language_model"} | head
    if layout == "hf-legacy":
        return {"visual", "model"} | head
    return {"vision_tower", "language_model.model"} | {f"language_model.{h}" for h in head}


def _prefix(key: str, family: str, layout: str) -> str:
    parts = key.split(".")
    two = ".".join(parts[:2])
    return two if two in _expected_prefixes(family, layout) else parts[0]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_layout_generates(checkpoint_factory, family, layout):
    path = checkpoint_factory(family, layout)
    cfg = _config(path)
    ids = token_ids(family)
    weights = mx.load(str(path / "model.safetensors"))
    assert {_prefix(k, family, layout) for k in weights} == _expected_prefixes(family, layout)
    assert (
        _text_config(cfg)["vocab_size"]
        == vocab_size(tokenizer_style(family))
        == len(ids) + BPE_VOCAB_SIZE
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (path / name).is_file(), name
    if layout == "hf":
        assert (path / "chat_template.jinja").is_file()
    else:
        assert "chat_template" in json.loads((path / "tokenizer_config.json").read_text())
    if family in VLM_FAMILIES:
        assert (path / "preprocessor_config.json").is_file()
        assert (path / "video_preprocessor_config.json").is_file()
        for field, content in VISION_TOKENS.items():
            assert cfg[field] == ids[content], field
    eos = _text_config(cfg)["eos_token_id"]
    assert (ids["<|eot_id|>"] if family == "llama" else ids["<|im_end|>"]) in np.atleast_1d(eos)
    if layout in MLX_LAYOUTS:
        meta = json.loads((path / "model.safetensors.index.json").read_text())
        assert set(meta["weight_map"]) == set(weights)
        quant = MLX_LAYOUTS[layout]
        if quant:
            expected = {"group_size": quant[0], "bits": quant[1], "mode": "affine"}
            assert cfg["quantization"] == cfg["quantization_config"] == expected
        else:
            assert "quantization" not in cfg


@pytest.mark.parametrize("layout", ["hf", "hf-legacy", "mlx-4bit"])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3", "llama"])
def test_tokenizer_loads_and_round_trips(checkpoint_factory, family, layout):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint_factory(family, layout)))
    raw = build_tokenizer(tokenizer_style(family))
    ids = tok(TEXT)["input_ids"]
    assert ids == raw.encode(TEXT).ids
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    assert len(tok) == vocab_size(tokenizer_style(family))
    for content, i in token_ids(family).items():
        assert tok.convert_tokens_to_ids(content) == i
        assert tok(content, add_special_tokens=False)["input_ids"] == [i]
    if family == "llama":
        assert ids[0] == token_ids("llama")["<|begin_of_text|>"]
        assert tok.eos_token == "<|eot_id|>"
    else:
        assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_tokenizer_is_deterministic_across_processes():
    code = "from shared.testing.tokenizer import _trained_json as j; print(j('qwen') + j('llama3'))"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            check=True,
        ).stdout
        for seed in ("0", "1")
    }
    assert outs == {_trained_json("qwen") + _trained_json("llama3") + "\n"}


@pytest.mark.parametrize("layout", ["hf", "hf-legacy"])
@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vlm_template_renders_vision_placeholders(checkpoint_factory, family, layout):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint_factory(family, layout)))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "video"},
                {"type": "text", "text": "What is this?"},
            ],
        }
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>"
        "What is this?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids.count(token_ids(family)["<|image_pad|>"]) == 1


def test_text_templates(checkpoint_factory):
    from transformers import AutoTokenizer

    user = [{"role": "user", "content": "Hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    qwen2 = AutoTokenizer.from_pretrained(str(checkpoint_factory("qwen2", "hf")))
    out = qwen2.apply_chat_template(user, tools=[tool], tokenize=False, add_generation_prompt=True)
    assert out.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert "<tools>\n" + json.dumps(tool) + "\n</tools>" in out
    qwen3 = AutoTokenizer.from_pretrained(str(checkpoint_factory("qwen3", "hf-legacy")))
    out = qwen3.apply_chat_template(
        user, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert out == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    llama = AutoTokenizer.from_pretrained(str(checkpoint_factory("llama", "hf")))
    out = llama.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert out == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def _torch_logits(path: Path, family: str):
    import torch
    import transformers

    cls_name = {
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    }.get(family, "AutoModelForCausalLM")
    model, info = getattr(transformers, cls_name).from_pretrained(
        str(path), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 390, (1, 40), generator=gen)
    kwargs = {}
    if family in VLM_FAMILIES:
        t = token_ids(family)
        ids[0, 5], ids[0, 6:10], ids[0, 10] = (
            t["<|vision_start|>"],
            t["<|image_pad|>"],
            t["<|vision_end|>"],
        )
        kwargs = {  # a 56x56 image: grid (1, 4, 4) -> 16 patches -> 4 merged tokens
            "pixel_values": torch.randn(16, 3 * 2 * 14 * 14, generator=gen),
            "image_grid_thw": torch.tensor([[1, 4, 4]]),
            "mm_token_type_ids": (ids == t["<|image_pad|>"]).int(),
        }
    with torch.no_grad():
        return model.eval()(input_ids=ids, **kwargs).logits[0].numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_and_legacy_load_to_identical_logits(checkpoint_factory, family):
    hf = _torch_logits(checkpoint_factory(family, "hf"), family)
    legacy = _torch_logits(checkpoint_factory(family, "hf-legacy"), family)
    np.testing.assert_array_equal(hf, legacy)
    top2 = np.sort(hf, axis=-1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    assert margins.min() > 1e-3 and np.median(margins) > 0.05, margins  # no sea of ties


def _legacy_to_mlx(family: str, key: str) -> str:
    if family not in VLM_FAMILIES:
        return key
    if key.startswith("visual."):
        return "vision_tower." + key[len("visual.") :]
    return "language_model." + key


@pytest.mark.parametrize("family", FAMILIES)
def test_mlx_weights_equal_the_hub_weights(checkpoint_factory, family):
    src = mx.load(str(checkpoint_factory(family, "hf-legacy") / "model.safetensors"))
    dst = mx.load(str(checkpoint_factory(family, "mlx") / "model.safetensors"))
    assert set(dst) == {_legacy_to_mlx(family, k) for k in src}
    for key, w in src.items():
        if key.endswith("patch_embed.proj.weight"):  # (E, C, T, P, P) -> (E, T, P, P, C)
            w = w.transpose(0, 2, 3, 4, 1)
        assert mx.array_equal(dst[_legacy_to_mlx(family, key)], w), key


@pytest.mark.parametrize("layout", ["mlx-4bit", "mlx-8bit"])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llama"])
def test_quantized_weights_dequantize_to_the_originals(checkpoint_factory, family, layout):
    group, bits = MLX_LAYOUTS[layout]
    ref = mx.load(str(checkpoint_factory(family, "mlx") / "model.safetensors"))
    q = mx.load(str(checkpoint_factory(family, layout) / "model.safetensors"))
    quantized = {k[: -len(".scales")] for k in q if k.endswith(".scales")}
    # Every 2-D language-model weight (Linear + Embedding) is quantized, nothing in vision.
    assert quantized == {
        k[: -len(".weight")] for k, w in ref.items() if w.ndim == 2 and "vision_tower" not in k
    }
    for key, w in ref.items():
        base = key[: -len(".weight")]
        if base not in quantized:
            assert mx.array_equal(q[key], w), key
            continue
        assert q[key].dtype == mx.uint32 and q[key].shape[-1] == w.shape[-1] * bits // 32
        deq = mx.dequantize(q[key], q[base + ".scales"], q[base + ".biases"], group, bits)
        # Within one quantization step |scale| (MLX snaps the offset so that 0 is exact, which
        # can cost up to a full step at a group's edge; scales may be negative).
        bound = mx.repeat(mx.abs(q[base + ".scales"]), group, axis=-1) + 1e-6
        assert mx.all(mx.abs(deq - w) <= bound).item(), key


@pytest.mark.parametrize("layout", ["hf", "hf-legacy", "mlx"])
@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_image_processor_config_loads_torch_free(checkpoint_factory, family, layout):
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    proc = Qwen2VLImageProcessorPil.from_pretrained(str(checkpoint_factory(family, layout)))
    assert (proc.patch_size, proc.merge_size, proc.temporal_patch_size) == (14, 2, 2)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 500, 3), np.uint8))
    out = proc(images=image)
    t, h, w = (int(x) for x in out["image_grid_thw"][0])
    assert t == 1 and h * w * 14 * 14 <= MAX_PIXELS
    assert np.asarray(out["pixel_values"]).shape == (h * w, 3 * 2 * 14 * 14)


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = make_checkpoint("qwen3", tmp_path / "a", "hf-legacy", seed=3)
    b = make_checkpoint("qwen3", tmp_path / "b", "hf-legacy", seed=3)
    c = make_checkpoint("qwen3", tmp_path / "c", "hf-legacy", seed=4)
    read = lambda p: (p / "model.safetensors").read_bytes()  # noqa: E731
    assert read(a) == read(b) != read(c)


def test_bfloat16_mlx_checkpoint(tmp_path):
    path = make_checkpoint("qwen2_5_vl", tmp_path / "bf16", "mlx-4bit", dtype="bfloat16")
    weights = mx.load(str(path / "model.safetensors"))
    assert weights["language_model.model.norm.weight"].dtype == mx.bfloat16
    assert weights["language_model.model.embed_tokens.scales"].dtype == mx.bfloat16
    assert weights["vision_tower.patch_embed.proj.weight"].dtype == mx.bfloat16


def test_import_does_not_need_torch():
    code = "import sys; sys.modules['torch'] = None; import shared.testing"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
