"""Model-size presets of the test fixtures (`SIZES`).

"tiny" (the test default; a few hundred kB) and "small" (LM 512 wide x 8 layers, a 4-block
ViT; ~27M parameters), for benchmarks that need real-sized matmuls while staying fast on a
CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_PIXELS = 56 * 56
MAX_PIXELS = 224 * 224
VIDEO_MIN_PIXELS = 56 * 56
VIDEO_MAX_PIXELS = 112 * 112

# Tiny language model shared by every family.
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 64, 2, 4, 2, 16, 128
MROPE_SECTION = [2, 3, 3]  # sums to HEAD_DIM / 2


@dataclass(frozen=True)
class Size:
    """Dimensions of one model-size preset (the language model is shared by every family)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int  # hidden / heads (Qwen2 derives it; Llama and Qwen3 store it)
    intermediate: int
    mrope_section: tuple[int, int, int]  # sums to head_dim / 2
    vision_depth: int
    vision_hidden: int  # Qwen2.5-VL `hidden_size`, Qwen2-VL `embed_dim`
    vision_heads: int
    vision_intermediate: int  # Qwen2.5-VL SwiGLU width
    vision_mlp_ratio: int  # Qwen2-VL MLP width = ratio x embed_dim
    fullatt_block_indexes: tuple[int, ...]  # Qwen2.5-VL blocks without windowing
    min_pixels: int
    max_pixels: int
    video_min_pixels: int
    video_max_pixels: int


SIZES: dict[str, Size] = {
    "tiny": Size(
        hidden=HIDDEN,
        layers=LAYERS,
        heads=HEADS,
        kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        intermediate=INTERMEDIATE,
        mrope_section=(MROPE_SECTION[0], MROPE_SECTION[1], MROPE_SECTION[2]),
        vision_depth=2,
        vision_hidden=32,
        vision_heads=2,
        vision_intermediate=64,
        vision_mlp_ratio=4,
        fullatt_block_indexes=(1,),
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        video_min_pixels=VIDEO_MIN_PIXELS,
        video_max_pixels=VIDEO_MAX_PIXELS,
    ),
    # A benchmark model: real-sized matmuls, fast on a CPU. M-RoPE keeps Qwen's 2:3:3 split
    # ([16, 24, 24] is for head_dim 128; here head_dim is 64). max_pixels is 1280 * 28 * 28,
    # so a 448x448 image is not resized (a 32x32 patch grid, 256 merged tokens).
    "small": Size(
        hidden=512,
        layers=8,
        heads=8,
        kv_heads=2,
        head_dim=64,
        intermediate=1408,
        mrope_section=(8, 12, 12),
        vision_depth=4,
        vision_hidden=256,
        vision_heads=4,
        vision_intermediate=512,
        vision_mlp_ratio=2,
        fullatt_block_indexes=(3,),
        min_pixels=MIN_PIXELS,
        max_pixels=1280 * 28 * 28,
        video_min_pixels=VIDEO_MIN_PIXELS,
        video_max_pixels=224 * 224,
    ),
}


def _size(size: str) -> Size:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {tuple(SIZES)}")
    return SIZES[size]
