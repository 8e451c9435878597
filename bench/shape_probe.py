"""Does MLX compile kernels per shape? Time the first and a repeated call of the decode step's
attention (queries of `width` tokens over a growing key span, boolean mask) at new spans.

    python bench/shape_probe.py
"""

from __future__ import annotations

import time
from functools import partial

import mlx.core as mx


def once(fn) -> float:
    t0 = time.perf_counter()
    mx.eval(fn())
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    print(mx.default_device())
    sdpa = mx.fast.scaled_dot_product_attention
    for width in (1, 5):
        for span in (500, 501, 502, 503, 520, 577, 640):
            q = mx.random.normal((8, 28, width, 128)).astype(mx.bfloat16)
            k = mx.random.normal((8, 4, span, 128)).astype(mx.bfloat16)
            mask = mx.ones((8, 1, width, span), mx.bool_)
            mx.eval(q, k, mask)

            call = partial(sdpa, q, k, k, scale=0.1, mask=mask)
            first, again = once(call), once(call)
            print(f"width {width} span {span}: first {first:.2f} ms, again {again:.2f} ms")


if __name__ == "__main__":
    main()
