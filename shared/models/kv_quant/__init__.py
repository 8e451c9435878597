"""KV cache quantization (uniform affine and TurboQuant) and the rotating window.

`config.KVQuantConfig` says what to store; `cache.decode_caches` makes a single sequence's
decode caches from its prefilled ones; `batch.make_batch_caches` makes the continuous-batching
slot caches. Both are `protocol.AttendingCache`s: attention reads their storage directly.
"""

from .batch import BatchQuantCache, WindowLayout, make_batch_caches
from .cache import QuantKVCache, decode_caches, make_codec
from .config import KVQuantConfig
from .protocol import AttendingCache

__all__ = [
    "AttendingCache",
    "BatchQuantCache",
    "KVQuantConfig",
    "QuantKVCache",
    "WindowLayout",
    "decode_caches",
    "make_batch_caches",
    "make_codec",
]
