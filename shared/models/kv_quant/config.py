"""What the KV cache stores: `KVQuantConfig` (scheme, bits, window) and its byte formula.

`bits` 0 keeps keys and values in the activations' dtype. `uniform` is MLX's affine
`mx.quantize` (per `group_size` values: a scale and a bias in the activations' dtype);
`turboquant` stores a norm per vector plus a Lloyd-Max code per rotated coordinate, and a
fractional setting splits the bits: 3.5 = 3-bit keys + 4-bit values. `max_kv_size` (0: off)
turns every sequence's decode cache into a window: its first `keep` tokens plus the latest
`max_kv_size - keep`.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

SCHEMES = ("uniform", "turboquant")
UNIFORM_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize's affine mode packs
TURBO_BITS = (2.0, 2.5, 3.0, 3.5, 4.0)
KEEP = 4  # leading tokens a window never drops (attention sinks), as mlx-lm keeps


@dataclass(frozen=True)
class KVQuantConfig:
    bits: float = 0  # 0: no quantization
    scheme: str = "uniform"
    group_size: int = 64  # uniform only
    max_kv_size: int = 0  # 0: no window
    keep: int = KEEP

    @property
    def quantized(self) -> bool:
        return self.bits > 0

    @property
    def active(self) -> bool:
        """Whether the decode caches differ from plain full-precision, unbounded ones."""
        return self.quantized or self.max_kv_size > 0

    @property
    def key_bits(self) -> int:
        return math.floor(self.bits)

    @property
    def value_bits(self) -> int:
        return math.ceil(self.bits)

    def check(self, head_dim: int | None = None) -> None:
        """Raise ValueError naming the first bad setting (`head_dim`: also check the model)."""
        if self.scheme not in SCHEMES:
            raise ValueError(f"kv quant scheme {self.scheme!r}: expected one of {SCHEMES}")
        if self.quantized and self.scheme == "uniform" and self.bits not in UNIFORM_BITS:
            raise ValueError(f"uniform kv bits {self.bits:g}: expected one of {UNIFORM_BITS}")
        if self.quantized and self.scheme == "turboquant" and self.bits not in TURBO_BITS:
            raise ValueError(f"turboquant kv bits {self.bits:g}: expected one of {TURBO_BITS}")
        if self.bits < 0 or self.group_size not in (32, 64, 128):
            raise ValueError("kv bits must be >= 0 and kv group size one of 32, 64, 128")
        if self.max_kv_size and self.max_kv_size <= self.keep:
            raise ValueError(f"max kv size {self.max_kv_size} must exceed keep={self.keep}")
        if head_dim is None or not self.quantized:
            return
        # Both schemes pack along head_dim: affine groups, or 32-code words (turboquant).
        unit = self.group_size if self.scheme == "uniform" else 32
        if head_dim % unit:
            raise ValueError(
                f"{self.scheme} kv quantization needs head_dim % {unit} == 0, got {head_dim}"
            )

    def head_token_bytes(self, head_dim: int, dtype_size: int) -> int:
        """Bytes of one token's key + value for one KV head."""
        if not self.quantized:
            return 2 * head_dim * dtype_size
        if self.scheme == "uniform":  # packed codes + a scale and a bias per group
            per_vector = (
                head_dim * int(self.bits) // 8 + 2 * (head_dim // self.group_size) * dtype_size
            )
            return 2 * per_vector
        codes = head_dim * (self.key_bits + self.value_bits) // 8
        return codes + 2 * dtype_size  # + one norm per key and per value

    def bytes_per_token(self, layers: int, kv_heads: int, head_dim: int, dtype_size: int) -> int:
        return layers * kv_heads * self.head_token_bytes(head_dim, dtype_size)

    def describe(self) -> str:
        text = f"{self.scheme} {self.bits:g}-bit" if self.quantized else "full precision"
        return text + (
            f", window {self.max_kv_size} (keep {self.keep})" if self.max_kv_size else ""
        )


def add_flags(parser: argparse.ArgumentParser, defaults: KVQuantConfig = KVQuantConfig()) -> None:
    """`--kv-bits`, `--kv-quant-scheme`, `--kv-group-size`, `--max-kv-size`."""
    parser.add_argument(
        "--kv-bits", type=float, default=defaults.bits,
        help="quantize the decode KV cache (0: off; uniform 4 or 8, turboquant 2-4, e.g. 3.5)",
    )  # fmt: skip
    parser.add_argument(
        "--kv-quant-scheme", choices=SCHEMES, default=defaults.scheme,
        help="uniform: MLX affine groups; turboquant: Hadamard rotation + Lloyd-Max codes",
    )  # fmt: skip
    parser.add_argument(
        "--kv-group-size", type=int, default=defaults.group_size,
        help="values per scale/bias pair (uniform)",
    )  # fmt: skip
    parser.add_argument(
        "--max-kv-size", type=int, default=defaults.max_kv_size,
        help=f"decode KV window per sequence: the first {KEEP} tokens + the latest (0: off)",
    )  # fmt: skip


def from_args(args: argparse.Namespace) -> KVQuantConfig:
    cfg = KVQuantConfig(args.kv_bits, args.kv_quant_scheme, args.kv_group_size, args.max_kv_size)
    cfg.check()
    return cfg
