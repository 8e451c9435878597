"""fp32 parity of the MLX Qwen2-VL / Qwen2.5-VL vision towers against transformers (torch, CPU).

Tiny random towers (depth 2-3, width 32, 2 heads) keep this to seconds; weights are drawn with
unit-scale statistics (not transformers' 0.02 init) so every path contributes to the output.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (  # noqa: E402
    Qwen2_5_VLVisionConfig,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (  # noqa: E402
    Qwen2_5_VisionTransformerPretrainedModel,
)
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (  # noqa: E402
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import (  # noqa: E402
    Qwen2VisionTransformerPretrainedModel,
)
from transformers.vision_utils import get_vision_window_index  # noqa: E402

from shared.models.qwen2_5_vl.config import VisionArgs as Qwen25VisionArgs  # noqa: E402
from shared.models.qwen2_5_vl.vision import VisionModel as Qwen25VisionModel  # noqa: E402
from shared.models.qwen2_5_vl.vision import window_index  # noqa: E402
from shared.models.qwen2_vl.config import VisionArgs as Qwen2VisionArgs  # noqa: E402
from shared.models.qwen2_vl.vision import VisionModel as Qwen2VisionModel  # noqa: E402
from shared.models.vision_layers import segment_attention  # noqa: E402

TOL = 1e-4
PATCH, TEMPORAL, MERGE = 14, 2, 2
PATCH_DIM = 3 * TEMPORAL * PATCH * PATCH

QWEN2_VISION = {
    "depth": 2,
    "embed_dim": 32,
    "hidden_size": 48,  # output width in Qwen2-VL's naming
    "num_heads": 2,
    "mlp_ratio": 2,
    "in_channels": 3,
    "patch_size": PATCH,
    "spatial_merge_size": MERGE,
    "temporal_patch_size": TEMPORAL,
}
QWEN25_VISION = {
    "depth": 3,
    "hidden_size": 32,
    "out_hidden_size": 48,
    "intermediate_size": 40,
    "num_heads": 2,
    "in_channels": 3,
    "patch_size": PATCH,
    "spatial_merge_size": MERGE,
    "temporal_patch_size": TEMPORAL,
    "window_size": 112,  # 4x4 merged tokens per window
    "fullatt_block_indexes": [1],
}


def rel_err(a: mx.array, b: np.ndarray) -> float:
    return float(np.abs(np.array(a) - b).max() / np.abs(b).max())


def randomize_(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif p.ndim == 1:  # norm scales
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(noise / np.sqrt(p[0].numel()))


def to_mlx(torch_model: torch.nn.Module, mlx_model) -> None:
    weights = {k: mx.array(v.numpy()) for k, v in torch_model.state_dict().items()}
    weights["rotary_pos_emb.inv_freq"] = mx.zeros((4,))  # some exports carry it; must be dropped
    mlx_model.load_weights(list(mlx_model.sanitize(weights).items()))


def make_pair(family: str):
    if family == "qwen2_vl":
        cfg = Qwen2VLVisionConfig(**QWEN2_VISION, attn_implementation="eager")
        ref = Qwen2VisionTransformerPretrainedModel(cfg)
        ours = Qwen2VisionModel(Qwen2VisionArgs.from_dict(QWEN2_VISION))
    else:
        cfg = Qwen2_5_VLVisionConfig(**QWEN25_VISION, attn_implementation="eager")
        ref = Qwen2_5_VisionTransformerPretrainedModel(cfg)
        ours = Qwen25VisionModel(Qwen25VisionArgs.from_dict(QWEN25_VISION))
    ref = ref.float().eval()
    randomize_(ref, seed=0 if family == "qwen2_vl" else 1)
    to_mlx(ref, ours)
    return ref, ours


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def pair(request):
    return request.param, *make_pair(request.param)


@pytest.fixture(scope="module")
def inputs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    processor = Qwen2VLImageProcessorPil(
        min_pixels=28 * 28, max_pixels=256 * 256, patch_size=PATCH, merge_size=MERGE
    )

    def images(*sizes: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        pics = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
        out = processor(images=pics, return_tensors="np")
        return out["pixel_values"].astype(np.float32), out["image_grid_thw"]

    one = images((224, 168))  # grid 12x16 -> 6x8 merged: partial windows in h, empty pad in w
    two = images((224, 168), (140, 196))  # second grid 14x10 -> 7x5 merged
    assert one[1].tolist() == [[1, 12, 16]] and two[1].tolist()[1] == [1, 14, 10]
    video_grid = np.array([[2, 8, 12]])  # t=2 temporal patches
    video = (rng.standard_normal((2 * 8 * 12, PATCH_DIM)).astype(np.float32), video_grid)
    mixed = (np.concatenate([one[0], video[0]]), np.concatenate([one[1], video_grid]))
    return {"one_image": one, "two_images": two, "video": video, "image_and_video": mixed}


def reference(ref: torch.nn.Module, pixels: np.ndarray, grid: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = ref(hidden_states=torch.from_numpy(pixels), grid_thw=torch.from_numpy(grid))
    return out.pooler_output.numpy()


@pytest.mark.parametrize("case", ["one_image", "two_images", "video", "image_and_video"])
def test_matches_transformers(pair, inputs, case):
    family, ref, ours = pair
    pixels, grid = inputs[case]
    expected = reference(ref, pixels, grid)
    got = ours(mx.array(pixels), mx.array(grid))
    assert got.shape == expected.shape
    err = rel_err(got, expected)
    print(f"{family} {case}: max rel err {err:.2e}")
    assert err < TOL


def test_weight_perturbation_is_detected(pair, inputs):
    family, ref, _ = pair
    pixels, grid = inputs["one_image"]
    expected = reference(ref, pixels, grid)
    ours = Qwen2VisionModel if family == "qwen2_vl" else Qwen25VisionModel
    args = Qwen2VisionArgs if family == "qwen2_vl" else Qwen25VisionArgs
    model = ours(args.from_dict(QWEN2_VISION if family == "qwen2_vl" else QWEN25_VISION))
    to_mlx(ref, model)
    qkv = model.blocks[0].attn.qkv
    qkv.weight = qkv.weight + mx.zeros_like(qkv.weight).at[0, 0].add(1e-2)
    err = rel_err(model(mx.array(pixels), grid), expected)
    print(f"{family} perturbed qkv[0, 0] by 1e-2: max rel err {err:.2e}")
    assert err > TOL


def test_sanitize_is_idempotent(pair):
    family, ref, ours = pair
    w = {"patch_embed.proj.weight": mx.array(ref.patch_embed.proj.weight.detach().numpy())}
    once = ours.sanitize(w)["patch_embed.proj.weight"]
    assert once.shape == (32, TEMPORAL, PATCH, PATCH, 3)
    assert mx.array_equal(
        ours.sanitize({"patch_embed.proj.weight": once})["patch_embed.proj.weight"], once
    )
    prefixed = ours.sanitize({"vision_tower.patch_embed.proj.weight": w["patch_embed.proj.weight"]})
    assert mx.array_equal(prefixed["vision_tower.patch_embed.proj.weight"], once)


@pytest.mark.parametrize(
    "grid", [[[1, 12, 16]], [[1, 12, 16], [1, 14, 10], [2, 8, 8]], [[3, 16, 4]]]
)
def test_window_index_matches_transformers(grid):
    expected_index, expected_cu = get_vision_window_index(
        torch.tensor(grid), spatial_merge_size=MERGE, window_size=112, patch_size=PATCH
    )
    index, cu = window_index(grid, MERGE, 112, PATCH)
    assert index.tolist() == expected_index.tolist()
    assert cu == expected_cu.tolist()


def test_segment_attention_matches_dense_mask():
    rng = np.random.default_rng(0)
    cu = [0, 5, 5, 12, 17, 20, 32]  # mixed lengths, one empty segment
    q, k, v = (mx.array(rng.standard_normal((32, 2, 8)).astype(np.float32)) for _ in range(3))
    seg = np.repeat(np.arange(len(cu) - 1), np.diff(cu))
    mask = np.where(seg[:, None] == seg[None, :], 0.0, -np.inf).astype(np.float32)
    scores = np.einsum("qhd,khd->hqk", np.array(q), np.array(k)) * 8**-0.5 + mask
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    dense = np.einsum("hqk,khd->qhd", probs, np.array(v)).reshape(32, 16)
    assert rel_err(segment_attention(q, k, v, cu, 8**-0.5), dense) < 1e-5
