"""Engine limits: flags in, the derived numbers (context, vocab, KV budget) out."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import mlx.core as mx

from services.common.flags import env
from services.decoder.apc.hashing import HASHES
from services.decoder.apc.prefix import PrefixConfig
from shared.loading.config import text_config
from shared.runtime.loaded import LoadedModel


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int = 0  # prompt + completion limit; 0: the model's max_position_embeddings
    max_waiting: int = 64  # queued (not yet admitted) requests beyond this are refused
    max_num_seqs: int = 32  # rows decoding together
    max_num_batched_tokens: int = 2048  # per step: 1 per decoding row, the rest for prefill
    kv_cache_tokens: int = 0  # KV budget in tokens; 0: from kv_cache_memory_mb, else unlimited
    kv_cache_memory_mb: int = 0  # KV budget in MiB (converted with the model's bytes/token)
    top_logprobs_k: int = 0  # most alternatives a request may ask for (0: only the token's own)
    prefix: PrefixConfig = PrefixConfig()  # automatic prefix caching
    # Derived by `resolve`:
    vocab_size: int = 0
    kv_tokens: int = 0
    kv_bytes_per_token: int = 0

    def resolve(self, model: LoadedModel, **overrides: int | None) -> EngineConfig:
        """Fill the derived fields from the model; keyword overrides (None = keep) first."""
        cfg = dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})
        text = text_config(model.config)
        max_len = cfg.max_model_len or int(text.get("max_position_embeddings") or 32768)
        per_token = kv_bytes_per_token(model)
        if cfg.kv_cache_tokens:
            kv = cfg.kv_cache_tokens
        elif cfg.kv_cache_memory_mb:
            kv = cfg.kv_cache_memory_mb * 2**20 // per_token
        else:  # the most the batch cache can ever hold: every row at full context
            kv = cfg.max_num_seqs * max_len
        return dataclasses.replace(
            cfg,
            max_model_len=max_len,
            vocab_size=int(text["vocab_size"]),
            kv_tokens=int(kv),
            kv_bytes_per_token=per_token,
        )


def kv_dtype(model: LoadedModel) -> mx.Dtype:
    """The activations' dtype, which the KV cache holds (the final norm is never quantized)."""
    norm = getattr(getattr(model.language, "model", None), "norm", None)
    return norm.weight.dtype if norm is not None else mx.bfloat16


def kv_bytes_per_token(model: LoadedModel) -> int:
    """Keys + values of every layer for one token, in the activations' dtype."""
    lm = model.language
    assert lm is not None
    n_kv, head_dim = getattr(lm, "n_kv_heads", 1), getattr(lm, "head_dim", 128)
    return len(lm.layers) * 2 * n_kv * head_dim * kv_dtype(model).size


_FLAGS = (  # (flag, default, help); each also reads PRISM_<FLAG IN CAPITALS>
    ("--max-num-seqs", 32, "most requests decoding together (the batch's rows)"),
    ("--max-num-batched-tokens", 2048, "tokens per step: 1 per decoding row, the rest prefill"),
    ("--kv-cache-tokens", 0, "KV budget in tokens (0: --kv-cache-memory-mb, else no limit)"),
    ("--kv-cache-memory-mb", 0, "KV budget in MiB, converted with the model's bytes per token"),
    ("--top-logprobs-k", 0, "most top_logprobs a request may ask for (more: 400)"),
)


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    for flag, default, text in _FLAGS:
        name = "PRISM_" + flag.removeprefix("--").replace("-", "_").upper()
        value = int(env(name, str(default)) or default)
        parser.add_argument(flag, type=int, default=value, help=f"{text} [{name}]")


def add_prefix_flags(parser: argparse.ArgumentParser) -> None:
    """Automatic prefix caching; the environment names are mlx-vlm's."""
    on = (env("APC_ENABLED", "1") or "1").lower() not in ("0", "false", "no", "off")
    parser.add_argument(
        "--apc", action=argparse.BooleanOptionalAction, default=on,
        help="reuse the KV of cached prompt prefixes [APC_ENABLED]",
    )  # fmt: skip
    for flag, name, default, text in (
        ("--apc-block-size", "APC_BLOCK_SIZE", 16, "tokens per prefix block"),
        ("--apc-num-blocks", "APC_NUM_BLOCKS", 2048, "blocks the decoder's memory tier holds"),
    ):
        value = int(env(name, str(default)) or default)
        parser.add_argument(flag, type=int, default=value, help=f"{text} [{name}]")
    parser.add_argument(
        "--apc-hash", choices=HASHES, default=env("APC_HASH", "xxhash"),
        help="block hash: fast non-cryptographic xxhash, or sha256 [APC_HASH]",
    )  # fmt: skip
    parser.add_argument(
        "--apc-remote", action=argparse.BooleanOptionalAction,
        default=(env("APC_REMOTE", "1") or "1").lower() not in ("0", "false", "no", "off"),
        help="keep blocks in the cache service too (shared by replicas, survives restarts) "
        "[APC_REMOTE]",
    )  # fmt: skip


def prefix_config_from_args(args: argparse.Namespace) -> PrefixConfig:
    return PrefixConfig(args.apc, args.apc_block_size, args.apc_num_blocks, args.apc_hash)


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        max_model_len=args.max_model_len,
        max_waiting=args.max_waiting,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_tokens=args.kv_cache_tokens,
        kv_cache_memory_mb=args.kv_cache_memory_mb,
        top_logprobs_k=args.top_logprobs_k,
        prefix=prefix_config_from_args(args),
    )
