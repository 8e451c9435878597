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
from shared.models.kv_quant import KVQuantConfig
from shared.models.kv_quant import config as kv_quant_flags
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
    kv_quant: KVQuantConfig = KVQuantConfig()  # decode KV quantization / window (#7)
    draft_kind: str = ""  # speculative decoding: draft | ngram | eagle3 ("": from draft_model)
    draft_model: str = ""  # the drafter's checkpoint (draft, eagle3)
    num_draft_tokens: int = 4  # tokens drafted per row per step (0: no speculation)
    # Derived by `resolve`:
    vocab_size: int = 0
    kv_tokens: int = 0
    kv_bytes_per_token: int = 0

    def resolve(self, model: LoadedModel, **overrides: int | str | None) -> EngineConfig:
        """Fill the derived fields from the model; keyword overrides (None = keep) first."""
        cfg = dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})
        text = text_config(model.config)
        max_len = cfg.max_model_len or int(text.get("max_position_embeddings") or 32768)
        per_token = kv_bytes_per_token(model, cfg.kv_quant)
        if cfg.kv_quant.max_kv_size:
            check_kv_window(cfg, text)
        if cfg.kv_cache_tokens:
            kv = cfg.kv_cache_tokens
        elif cfg.kv_cache_memory_mb:
            kv = cfg.kv_cache_memory_mb * 2**20 // per_token
        else:  # the most the batch cache can ever hold: every row at full context (or window)
            kv = cfg.max_num_seqs * min(max_len, cfg.kv_quant.max_kv_size or max_len)
        return dataclasses.replace(
            cfg,
            max_model_len=max_len,
            vocab_size=int(text["vocab_size"]),
            kv_tokens=int(kv),
            kv_bytes_per_token=per_token,
        )


def check_kv_window(cfg: EngineConfig, text: dict) -> None:
    """Refuse, at start-up, what a rotating KV window (--max-kv-size) breaks: rolling back
    rejected drafts, and masks that find keys by position (sliding-window layers)."""
    if cfg.draft_kind or cfg.draft_model:
        raise ValueError("--max-kv-size with speculative decoding: a window cannot roll back")
    layer_types = " ".join(str(t) for t in text.get("layer_types") or ())
    if (
        text.get("use_sliding_window")
        or text.get("sliding_window_pattern")
        or "sliding" in layer_types
    ):
        raise ValueError("--max-kv-size with a sliding-window model: its masks need key positions")


def kv_dtype(model: LoadedModel) -> mx.Dtype:
    """The activations' dtype, which the KV cache holds (the final norm is never quantized)."""
    norm = getattr(getattr(model.language, "model", None), "norm", None)
    return norm.weight.dtype if norm is not None else mx.bfloat16


def kv_bytes_per_token(model: LoadedModel, quant: KVQuantConfig | None = None) -> int:
    """Keys + values of every layer for one token as the decode slots store them: in the
    activations' dtype, or quantized (codes + scales/norms, `KVQuantConfig.head_token_bytes`).
    Raises ValueError when `quant` does not fit the model (e.g. head_dim vs group size)."""
    lm = model.language
    assert lm is not None
    n_kv, head_dim = getattr(lm, "n_kv_heads", 1), getattr(lm, "head_dim", 128)
    quant = quant or KVQuantConfig()
    quant.check(head_dim)
    return quant.bytes_per_token(len(lm.layers), n_kv, head_dim, kv_dtype(model).size)


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
    add_kv_quant_flags(parser)


def add_kv_quant_flags(parser: argparse.ArgumentParser) -> None:
    """--kv-bits, --kv-quant-scheme, --kv-group-size, --max-kv-size; defaults from
    PRISM_KV_BITS, PRISM_KV_QUANT_SCHEME, PRISM_KV_GROUP_SIZE, PRISM_MAX_KV_SIZE."""
    base = KVQuantConfig()
    defaults = KVQuantConfig(
        bits=float(env("PRISM_KV_BITS", "") or base.bits),
        scheme=env("PRISM_KV_QUANT_SCHEME", "") or base.scheme,
        group_size=int(env("PRISM_KV_GROUP_SIZE", "") or base.group_size),
        max_kv_size=int(env("PRISM_MAX_KV_SIZE", "") or base.max_kv_size),
    )
    kv_quant_flags.add_flags(parser, defaults)


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


def add_spec_flags(parser: argparse.ArgumentParser) -> None:
    """Speculative decoding (off unless --draft-kind or --draft-model is given)."""
    parser.add_argument(
        "--draft-model", default=env("PRISM_DRAFT_MODEL", "") or "",
        help="drafter checkpoint: a small LM sharing the tokenizer, or an EAGLE-3 speculators "
        "checkpoint [PRISM_DRAFT_MODEL]",
    )  # fmt: skip
    parser.add_argument(
        "--draft-kind", choices=["draft", "ngram", "eagle3"],
        default=env("PRISM_DRAFT_KIND", "") or None,
        help="draft (a draft model), ngram (prompt lookup, no model) or eagle3; default: "
        "eagle3 or draft from --draft-model's config [PRISM_DRAFT_KIND]",
    )  # fmt: skip
    parser.add_argument(
        "--num-draft-tokens", type=int, default=int(env("PRISM_NUM_DRAFT_TOKENS", "4") or 4),
        help="tokens drafted per sequence per step [PRISM_NUM_DRAFT_TOKENS]",
    )  # fmt: skip


def spec_flags_error(args: argparse.Namespace) -> str:
    """Why the speculative flags cannot work ("" when they can), before any model loads."""
    if args.num_draft_tokens < 0:
        return "--num-draft-tokens must be >= 0"
    if args.draft_kind in ("draft", "eagle3") and not args.draft_model:
        return f"--draft-kind {args.draft_kind} needs --draft-model"
    return ""


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
        kv_quant=kv_quant_flags.from_args(args),
        draft_kind=getattr(args, "draft_kind", None) or "",
        draft_model=getattr(args, "draft_model", "") or "",
        num_draft_tokens=getattr(args, "num_draft_tokens", 4),
    )
