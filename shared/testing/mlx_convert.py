"""Convert a Hugging Face checkpoint directory to the mlx-community layout.

This is the "other side" the runtime loader is tested against, so it is written independently
of `shared/loading`. It reproduces what `mlx_vlm.convert` (VLMs) and `mlx_lm.convert` (text)
write, without importing them:

- weights renamed to the mlx-vlm names: `vision_tower.*`, `language_model.model.*`,
  `language_model.lm_head.*` (text models keep `model.*` / `lm_head.*`); the patch-embed
  Conv3d weight is moved to channels-last `(embed, T, P, P, C)`; tied heads are not stored;
- quantized layouts: every 2-D language-model weight (Linear and Embedding) whose last dim is
  divisible by the group size goes through `mx.quantize` (affine), stored as `.weight`
  (packed uint32), `.scales`, `.biases`; the vision tower is never quantized (mlx-vlm skips
  multimodal modules); config.json gains `quantization` and the same `quantization_config`;
- config.json is the source config as the tools save it: mlx-vlm merges
  generation_config.json into it (a nested `generation_config` plus its eos/sampling keys at
  the root) and drops `torch_dtype`; mlx-lm only copies `eos_token_id`. Keys are sorted;
- weights go to `model.safetensors` (metadata format=mlx) with a `model.safetensors.index.json`;
  tokenizer, template and processor files are copied.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx

VLM_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
# Root keys mlx-vlm copies from generation_config.json into config.json.
GENERATION_KEYS = ("eos_token_id", "temperature", "top_p", "top_k", "do_sample")
SIDECAR_PATTERNS = ("*.json", "*.jinja", "*.txt")
SKIP_SIDECARS = ("config.json", "model.safetensors.index.json")


def _is_vlm(config: dict[str, Any]) -> bool:
    return config.get("model_type") in VLM_MODEL_TYPES or "vision_config" in config


def _vlm_key(key: str) -> str:
    """Hub (`visual.*`, `model.*`) or transformers-5 (`model.visual.*`,
    `model.language_model.*`) names -> mlx-vlm names."""
    for prefix in ("model.visual.", "visual."):
        if key.startswith(prefix):
            return "vision_tower." + key[len(prefix) :]
    if key.startswith("model.language_model."):
        return "language_model.model." + key[len("model.language_model.") :]
    if key.startswith("model."):
        return "language_model.model." + key[len("model.") :]
    if key.startswith("lm_head."):
        return "language_model." + key
    return key


def _channels_last(w: mx.array) -> mx.array:
    """PyTorch Conv3d `(embed, C, T, P, P)` -> MLX `(embed, T, P, P, C)`."""
    if w.ndim == 5 and w.shape[1] in (1, 3) and w.shape[-1] not in (1, 3):
        return w.transpose(0, 2, 3, 4, 1)
    return w


def rename_weights(weights: dict[str, mx.array], config: dict[str, Any]) -> dict[str, mx.array]:
    vlm = _is_vlm(config)
    tied = bool(config.get("tie_word_embeddings", False))
    out: dict[str, mx.array] = {}
    for key, w in weights.items():
        if "rotary_emb.inv_freq" in key or key.endswith("position_ids"):
            continue  # buffers, not parameters
        if tied and key.endswith("lm_head.weight"):
            continue  # the embedding is the head
        if vlm:
            key = _vlm_key(key)
            if key.endswith("patch_embed.proj.weight"):
                w = _channels_last(w)
            elif key.endswith("patch_embedding.weight") and w.ndim == 4:  # SigLIP Conv2d
                w = w.transpose(0, 2, 3, 1)  # (D, C, P, P) -> MLX (D, P, P, C), as mlx-vlm
        out[key] = w
    return out


def _quantizable(key: str, w: mx.array, group_size: int) -> bool:
    if not key.endswith(".weight") or w.ndim != 2:
        return False
    if "vision" in key:  # mlx-vlm's skip_multimodal_module
        return False
    return w.shape[-1] % group_size == 0


def quantize_weights(
    weights: dict[str, mx.array], group_size: int, bits: int
) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    for key, w in weights.items():
        if not _quantizable(key, w, group_size):
            out[key] = w
            continue
        q, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
        base = key[: -len(".weight")]
        out[key] = q
        out[base + ".scales"] = scales
        out[base + ".biases"] = biases
    return out


def _mlx_config(
    config: dict[str, Any], generation: dict[str, Any] | None, vlm: bool
) -> dict[str, Any]:
    config = dict(config)
    if generation:
        if vlm:
            config["generation_config"] = generation
            for k in GENERATION_KEYS:
                if k in generation:
                    config[k] = generation[k]
        elif generation.get("eos_token_id"):
            config["eos_token_id"] = generation["eos_token_id"]
    config.pop("_name_or_path", None)
    if vlm:
        config.pop("torch_dtype", None)
    else:
        config.pop("vision_config", None)
    return dict(sorted(config.items()))


def _load_weights(src: Path) -> dict[str, mx.array]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors in {src}")
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(mx.load(str(f)))
    return weights


def _cast(weights: dict[str, mx.array], dtype: str | None) -> dict[str, mx.array]:
    if dtype is None:
        return weights
    target = getattr(mx, dtype)
    return {
        k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in weights.items()
    }


def _save(dst: Path, weights: dict[str, mx.array]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    weights = dict(sorted(weights.items()))
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "mlx"})
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
        "weight_map": {k: "model.safetensors" for k in weights},
    }
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def convert(
    src: Path,
    dst: Path,
    *,
    quantize: bool = False,
    q_group_size: int = 64,
    q_bits: int = 4,
    dtype: str | None = None,
) -> Path:
    """Convert the HF checkpoint in `src` into `dst`; return `dst`.

    dtype: cast floating weights (default: the config's `torch_dtype`, as the tools do).
    """
    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    gen_path = src / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.exists() else None
    vlm = _is_vlm(config)

    dtype = dtype or config.get("torch_dtype") or config.get("dtype")
    weights = _cast(rename_weights(_load_weights(src), config), dtype)
    config = _mlx_config(config, generation, vlm)
    if quantize:
        weights = quantize_weights(weights, q_group_size, q_bits)
        quant = {"group_size": q_group_size, "bits": q_bits, "mode": "affine"}
        config["quantization"] = quant
        config["quantization_config"] = dict(quant)
        config = dict(sorted(config.items()))

    _save(dst, weights)
    (dst / "config.json").write_text(json.dumps(config, indent=4))
    for pattern in SIDECAR_PATTERNS:
        for f in sorted(src.glob(pattern)):
            if f.name not in SKIP_SIDECARS:
                shutil.copy(f, dst / f.name)
    return dst
