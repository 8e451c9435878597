"""Automatic prefix caching on the engine thread: match a prompt's leading blocks at admission,
load them into its prefill cache, and keep the blocks its prefill computed.

The prompt is hashed into block keys off the engine thread (`keys`, from the servicer), the
memory tier is `pool.BlockPool`, and the cache service is the next tier (`remote.RemoteTier`
fills the pool before a request is submitted and takes the new blocks this class hands it).
Only whole blocks are reused and never the prompt's last token, whose logits must be computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx
import structlog

from services.decoder.apc.hashing import MediaSpan, block_keys, model_identity, root_key
from services.decoder.apc.pool import Block, BlockPool
from shared.loading.config import text_config
from shared.models.cache import KVCache
from shared.runtime.loaded import LoadedModel

log = structlog.get_logger("decoder")

NewBlocks = list[tuple[str, mx.array]]  # (key, evaluated block) for the next tier


@dataclass(frozen=True)
class PrefixConfig:
    enabled: bool = True
    block_size: int = 16  # tokens per block
    num_blocks: int = 2048  # memory tier capacity, in blocks
    hash_name: str = "xxhash"  # or "sha256"


class Prefixed(Protocol):
    """What the prefix cache reads and sets on a sequence."""

    prompt_len: int
    prefilled: int
    cached_tokens: int
    prefix_keys: list[str]
    prefix_blocks: list[Block]


@dataclass
class PrefixCounters:
    queries: int = 0  # prompts looked up
    query_tokens: int = 0  # their prompt tokens
    matched_tokens: int = 0  # of which came from cached blocks
    blocks_written: int = 0  # new blocks handed to the next tier


def unsupported_reason(model: LoadedModel) -> str | None:
    """Why this model's KV cannot be cut into reusable blocks (None: it can)."""
    text = text_config(model.config)
    sliding = text.get("use_sliding_window") or any(
        "sliding" in str(t) for t in text.get("layer_types") or ()
    )
    assert model.language is not None
    # A model that applies its window as a mask over full KV (Gemma 3) keeps every position.
    if sliding and not getattr(model.language, "keeps_full_kv", False):
        return "sliding-window attention: a block's KV depends on what the window dropped"
    if not all(type(c) is KVCache for c in model.language.make_cache()):
        return "the model's layer caches are not plain KV caches"
    return None


class PrefixCache:
    def __init__(self, cfg: PrefixConfig, model: LoadedModel, kv_dtype: mx.Dtype) -> None:
        reason = unsupported_reason(model) if cfg.enabled else None
        if reason:
            log.info("apc_disabled", reason=reason)
        self.enabled = cfg.enabled and reason is None
        self.block_size, self.hash_name = cfg.block_size, cfg.hash_name
        lm: Any = model.language
        self.block_shape = (len(lm.layers), 2, lm.n_kv_heads, cfg.block_size, lm.head_dim)
        self.block_layout = (self.block_shape, kv_dtype)  # what a block from elsewhere must be
        block_bytes = kv_dtype.size
        for n in self.block_shape:
            block_bytes *= n
        self.pool = BlockPool(cfg.num_blocks * block_bytes if self.enabled else 0)
        self.model_id = model_identity(model.path, model.config, str(kv_dtype))
        self.counters = PrefixCounters()
        self.sink: Callable[[NewBlocks], None] | None = None  # the next tier, if any
        self._unsent: NewBlocks = []

    def keys(self, tokens: Sequence[int], media: Sequence[MediaSpan], tenant: str) -> list[str]:
        """The prompt's block keys (any thread); [] when APC is off."""
        if not self.enabled:
            return []
        root = root_key(self.model_id, self.block_size, tenant, self.hash_name)
        return block_keys(tokens, media, root, self.block_size, self.hash_name)

    def usable(self, keys: list[str], prompt_len: int) -> list[str]:
        """The keys a prompt may reuse: whole blocks that leave its last token to compute."""
        return keys[: (prompt_len - 1) // self.block_size]

    # ---- the engine thread -------------------------------------------------------------------

    def match(self, seq: Prefixed) -> None:
        """At admission: reuse the longest cached run of leading blocks (references taken)."""
        if not self.enabled or not seq.prefix_keys:
            return
        blocks = self.pool.match(self.usable(seq.prefix_keys, seq.prompt_len))
        c = self.counters
        c.queries += 1
        c.query_tokens += seq.prompt_len
        seq.prefix_blocks = blocks
        seq.prefilled = seq.cached_tokens = len(blocks) * self.block_size
        c.matched_tokens += seq.cached_tokens

    def load(self, seq: Prefixed, cache: list[Any]) -> None:
        """Write the matched blocks into the sequence's fresh prefill cache."""
        if not seq.prefix_blocks:
            return
        kv = mx.concatenate([b.kv for b in seq.prefix_blocks], axis=3)  # (L, 2, n_kv, T, D)
        for layer, layer_cache in enumerate(cache):
            layer_cache.update_and_fetch(kv[layer, 0][None], kv[layer, 1][None])

    def store(self, seq: Prefixed, cache: list[Any]) -> list[mx.array]:
        """After the prefill: keep the prompt's whole blocks not held yet; returns them lazily
        (the caller evaluates them with the step). Releases the matched blocks."""
        if not self.enabled or not seq.prefix_keys:
            return []
        bs, start = self.block_size, len(seq.prefix_blocks)
        todo = [(i, k) for i, k in enumerate(seq.prefix_keys) if i >= start and k not in self.pool]
        new: list[mx.array] = []
        if todo:
            keys = mx.stack([c.state[0][0] for c in cache])  # (L, n_kv, T, D)
            values = mx.stack([c.state[1][0] for c in cache])
            kv = mx.stack([keys, values], axis=1)
            # Last block first, so in the LRU the chain's head outlives its tail.
            for i, key in reversed(todo):
                block = mx.contiguous(kv[:, :, :, i * bs : (i + 1) * bs, :])  # owns its memory
                if self.pool.put(key, block):
                    new.append(block)
                    self._unsent.append((key, block))
        self.pool.touch(list(reversed(seq.prefix_keys)))
        self.release(seq)
        return new

    def release(self, seq: Prefixed) -> None:
        if seq.prefix_blocks:
            self.pool.release(seq.prefix_blocks)
            seq.prefix_blocks = []

    def flush(self) -> None:
        """Hand the blocks stored since the last flush to the next tier (once evaluated)."""
        if not self._unsent:
            return
        unsent, self._unsent = self._unsent, []
        if self.sink is None:
            return
        mx.eval([block for _, block in unsent])  # queued with an earlier step: done or nearly
        self.counters.blocks_written += len(unsent)
        self.sink(unsent)

    def reset(self) -> int:
        """Drop the blocks no request holds, and those not yet handed to the next tier."""
        self._unsent = []
        return self.pool.reset()
