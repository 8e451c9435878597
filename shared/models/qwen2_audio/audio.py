"""Qwen2-Audio's audio encoder (Whisper's encoder + a stride-2 average pool) and its projector.

transformers always runs the encoder on the full 30 s of padded mel frames and masks the padded
keys in attention. Every output Prism keeps depends only on the unpadded positions, so each clip
runs on just its own positions (plus the padded mel columns its last convolution window reads):
the same numbers, without the attention work on silence (a 5 s clip is 1/6 of the sequence).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from shared.models.qwen2_audio.config import AudioArgs, output_tokens

KERNEL = 3  # both convolutions


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)  # Whisper: no key bias
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        b, n, d = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(b, n, self.heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, n, d))


class EncoderLayer(nn.Module):
    def __init__(self, args: AudioArgs) -> None:
        super().__init__()
        self.self_attn = Attention(args.d_model, args.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(args.d_model)
        self.fc1 = nn.Linear(args.d_model, args.encoder_ffn_dim)
        self.fc2 = nn.Linear(args.encoder_ffn_dim, args.d_model)
        self.final_layer_norm = nn.LayerNorm(args.d_model)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(nn.gelu(self.fc1(self.final_layer_norm(x))))


class AudioEncoder(nn.Module):
    """transformers `Qwen2AudioEncoder`: (mel bins, frames) -> (frames / 4, d_model)."""

    def __init__(self, args: AudioArgs) -> None:
        super().__init__()
        self.args = args
        d = args.d_model
        self.conv1 = nn.Conv1d(args.num_mel_bins, d, KERNEL, padding=1)
        self.conv2 = nn.Conv1d(d, d, KERNEL, stride=2, padding=1)
        self.embed_positions = nn.Embedding(args.max_source_positions, d)
        self.layers = [EncoderLayer(args) for _ in range(args.encoder_layers)]
        self.layer_norm = nn.LayerNorm(d)

    def __call__(self, mel: mx.array, frames: int) -> mx.array:
        """One clip: mel (mel bins, padded frames), `frames` of them unpadded."""
        if not 0 < frames <= min(mel.shape[-1], self.args.mel_frames):
            # More than the padded length transformers requires would run past the positions.
            raise ValueError(f"{frames} mel frames; this encoder takes 1..{self.args.mel_frames}")
        positions = (frames - 1) // 2 + 1  # conv2 outputs that see real audio
        # conv2 output j reads conv1 outputs up to 2j+1, which read mel columns up to 2j+2.
        x = mel[:, : 2 * positions + 1].T[None]  # (1, T, mel bins): channels last
        x = nn.gelu(self.conv1(x))
        x = nn.gelu(self.conv2(x))[:, :positions]
        # `scale_embedding` is not applied: transformers' Qwen2AudioEncoder ignores it too.
        x = x + self.embed_positions.weight[:positions]
        for layer in self.layers:
            x = layer(x)
        tokens = output_tokens(frames)  # AvgPool1d(2, 2) keeps whole pairs only
        x = x[:, : 2 * tokens].reshape(1, tokens, 2, -1).mean(axis=2)
        return self.layer_norm(x)[0]


class Projector(nn.Module):
    def __init__(self, args: AudioArgs) -> None:
        super().__init__()
        self.linear = nn.Linear(args.d_model, args.projection_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(x)


class AudioTower(nn.Module):
    """The encoder service's half of Qwen2-Audio: log-mel clips in, LM embeddings out.

    Called like a vision tower: `pixel_values` (N, mel bins, padded frames) and `grid_thw` (N, 1)
    holding each clip's unpadded frame count. Returns (sum of each clip's tokens, LM hidden).
    """

    def __init__(self, args: AudioArgs) -> None:
        super().__init__()
        self.audio_tower = AudioEncoder(args)
        self.multi_modal_projector = Projector(args)

    def __call__(self, pixel_values: mx.array, grid_thw: mx.array) -> mx.array:
        frames = [int(f) for f in grid_thw.reshape(-1).tolist()]
        clips = [self.audio_tower(pixel_values[i], n) for i, n in enumerate(frames)]
        return self.multi_modal_projector(mx.concatenate(clips, axis=0))

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """PyTorch Conv1d weights (out, in, kernel) -> MLX (out, kernel, in); idempotent."""
        out = {}
        for key, w in weights.items():
            if key.endswith(("conv1.weight", "conv2.weight")) and w.shape[1] != KERNEL:
                w = w.transpose(0, 2, 1)
            out[key] = w
        return out
