"""SmolVLM / Idefics3 encoder half: SigLIP over every tile, pixel shuffle, linear projection.

The SigLIP transformer is Gemma 3's (`vision_model.*`: same layers, same names). transformers'
Idefics3 embeddings look positions up by bucketing each patch's fractional coordinate, which
for a full tile (the processor always gives `image_size`-square tiles) is the identity, so the
tower adds the position table row by row as SigLIP does. The connector (`connector.*`) folds
each `scale x scale` block of patches into one token (transformers' `pixel_shuffle`) and
projects it to the LM width. Tiles of all images go through in one batch.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from shared.models.gemma3.vision import SiglipTransformer, _conv_channels_last
from shared.models.smolvlm.config import TowerArgs


def pixel_shuffle(x: mx.array, scale: int) -> mx.array:
    """(N, side*side, D) -> (N, (side/scale)^2, D*scale^2), as transformers' `pixel_shuffle`."""
    n, seq, d = x.shape
    side = int(seq**0.5)
    x = x.reshape(n, side, side // scale, d * scale)
    x = x.transpose(0, 2, 1, 3).reshape(n, side // scale, side // scale, d * scale * scale)
    return x.transpose(0, 2, 1, 3).reshape(n, seq // scale**2, d * scale * scale)


class ModalityProjection(nn.Module):
    def __init__(self, args: TowerArgs) -> None:
        super().__init__()
        dim = args.vision.hidden_size * args.scale_factor**2
        self.proj = nn.Linear(dim, args.text_hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj(x)


class Connector(nn.Module):
    def __init__(self, args: TowerArgs) -> None:
        super().__init__()
        self.scale_factor = args.scale_factor
        self.modality_projection = ModalityProjection(args)

    def __call__(self, patches: mx.array) -> mx.array:
        return self.modality_projection(pixel_shuffle(patches, self.scale_factor))


class VisionModel(nn.Module):
    """Implements `VisionTower`: (tiles, 3, S, S) -> (tiles * tokens_per_tile, LM width)."""

    def __init__(self, args: TowerArgs) -> None:
        super().__init__()
        self.args = args
        side = args.vision.patches_per_side
        if side % args.scale_factor:
            raise ValueError(f"{side} patches per side do not divide by scale {args.scale_factor}")
        self.vision_model = SiglipTransformer(args.vision)
        self.connector = Connector(args)

    def __call__(self, pixel_values: mx.array, grid_thw: mx.array | None = None) -> mx.array:
        """`grid_thw` (images, 5) only sizes the split afterwards; every tile is one image."""
        size = self.args.vision.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"pixel_values must be (tiles, 3, {size}, {size}), got {tuple(pixel_values.shape)}"
            )
        dtype = self.vision_model.embeddings.position_embedding.weight.dtype
        hidden = self.vision_model(pixel_values.astype(dtype).transpose(0, 2, 3, 1))
        features = self.connector(hidden)
        return features.reshape(-1, features.shape[-1])

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop buffers; torch conv weights go channels-last (mlx-community's already are)."""
        out: dict[str, mx.array] = {}
        for key, value in weights.items():
            if key.endswith("position_ids"):
                continue
            if key.endswith("patch_embedding.weight"):
                value = _conv_channels_last(value, self.args.vision)
            out[key] = value
        return out
