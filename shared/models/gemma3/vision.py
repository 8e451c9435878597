"""Gemma 3's encoder half: the SigLIP vision transformer and the multi-modal projector (MLX).

Follows transformers' `SiglipVisionModel` (no pooling head, as Gemma 3 configures it) and
`Gemma3MultiModalProjector`: patch features are average-pooled from a p x p grid to
`mm_tokens_per_image` tokens, RMS-normed (Gemma's 1 + weight) and projected to the LM width.
Parameter names match the checkpoints under `vision_tower.` (`vision_model.*`,
`multi_modal_projector.*`), so the encoder service loads both and nothing of the LM.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from shared.models.gemma3.config import ProjectorArgs, VisionArgs
from shared.models.gemma3.norm import GemmaRMSNorm
from shared.models.vision_layers import VisionMlp


class Embeddings(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        p = args.patch_size
        self.patch_embedding = nn.Conv2d(args.num_channels, args.hidden_size, p, stride=p)
        self.position_embedding = nn.Embedding(args.patches_per_side**2, args.hidden_size)

    def __call__(self, pixels_nhwc: mx.array) -> mx.array:
        x = self.patch_embedding(pixels_nhwc)  # (N, p, p, D): row-major patches, as torch's
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return x + self.position_embedding.weight[None]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        b, n, _ = x.shape
        q, k, v = (
            proj(x).reshape(b, n, self.heads, -1).transpose(0, 2, 1, 3)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, n, -1))


class EncoderLayer(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.self_attn = Attention(args.hidden_size, args.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.mlp = VisionMlp(args.hidden_size, args.intermediate_size, args.hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.layers = [EncoderLayer(args) for _ in range(args.num_hidden_layers)]


class SiglipTransformer(nn.Module):
    """`vision_model.*`: patch + position embeddings, encoder, final LayerNorm."""

    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.embeddings = Embeddings(args)
        self.encoder = Encoder(args)
        self.post_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def __call__(self, pixels_nhwc: mx.array) -> mx.array:
        x = self.embeddings(pixels_nhwc)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class MultiModalProjector(nn.Module):
    def __init__(self, args: ProjectorArgs) -> None:
        super().__init__()
        vision = args.vision
        self.side, self.kernel = vision.patches_per_side, args.kernel_size
        self.mm_input_projection_weight = mx.zeros((vision.hidden_size, args.text_hidden_size))
        self.mm_soft_emb_norm = GemmaRMSNorm(vision.hidden_size, eps=vision.layer_norm_eps)

    def __call__(self, patches: mx.array) -> mx.array:
        """(N, p*p, D) patch features -> (N, tokens, text hidden), tokens in row-major order."""
        n, _, d = patches.shape
        t, k = self.side // self.kernel, self.kernel
        # AvgPool2d(k, stride k) over the p x p grid (p = t * k; a remainder is dropped, as torch).
        grid = patches.reshape(n, self.side, self.side, d)[:, : t * k, : t * k]
        pooled = grid.reshape(n, t, k, t, k, d).mean(axis=(2, 4)).reshape(n, t * t, d)
        normed = self.mm_soft_emb_norm(pooled)
        return (normed @ self.mm_input_projection_weight).astype(patches.dtype)


class VisionModel(nn.Module):
    """Implements `VisionTower`: (N, C, H, W) images -> (N * mm_tokens_per_image, text hidden)."""

    def __init__(self, args: ProjectorArgs) -> None:
        super().__init__()
        self.args = args
        self.vision_model = SiglipTransformer(args.vision)
        self.multi_modal_projector = MultiModalProjector(args)

    def __call__(self, pixel_values: mx.array, grid_thw: mx.array | None = None) -> mx.array:
        """`grid_thw` (images, (crops, p, p)) only sizes the split; every crop is one image."""
        dtype = self.vision_model.embeddings.position_embedding.weight.dtype
        size = self.args.vision.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"pixel_values must be (N, 3, {size}, {size}), got {tuple(pixel_values.shape)}"
            )
        hidden = self.vision_model(pixel_values.astype(dtype).transpose(0, 2, 3, 1))
        features = self.multi_modal_projector(hidden)
        return features.reshape(-1, features.shape[-1])

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop buffers and the unused SigLIP head; torch conv weights go channels-last.
        transformers 5 names the tower's own weights without `vision_model.` (Hub: with)."""
        out: dict[str, mx.array] = {}
        for key, value in weights.items():
            if key.endswith("position_ids") or "head." in key:
                continue
            if key.startswith(("embeddings.", "encoder.", "post_layernorm.")):
                key = "vision_model." + key
            if key.endswith("patch_embedding.weight"):
                value = _conv_channels_last(value, self.args.vision)
            out[key] = value
        return out


def _conv_channels_last(weight: mx.array, args: VisionArgs) -> mx.array:
    """(D, C, P, P) torch layout -> (D, P, P, C); already channels-last passes (idempotent)."""
    c, p = args.num_channels, args.patch_size
    if weight.ndim == 4 and tuple(weight.shape[1:]) == (p, p, c):
        return weight
    if weight.ndim == 4 and tuple(weight.shape[1:]) == (c, p, p):
        return weight.transpose(0, 2, 3, 1)
    raise ValueError(f"patch_embedding.weight has shape {tuple(weight.shape)}")
