"""Decode attention (one query per row) on MLX, 28 layers' worth of calls queued before one
evaluation, as a decode step queues them (issue #10).

    python bench/attention_probe.py

Qwen2.5-7B shapes (28 query heads, 4 KV heads, head_dim 128), bf16, 512 keys:
- per batch size (rows 1, 8, 32): `mx.fast.scaled_dot_product_attention` with no mask, with the
  slot cache's boolean mask (rows of different lengths), and with the same as an additive mask;
- one row: SDPA against two matmuls with the query heads of each KV head folded into rows.
"""

from __future__ import annotations

import time

import mlx.core as mx

LAYERS, HEADS, KV_HEADS, DIM, SPAN = 28, 28, 4, 128, 512
SCALE = DIM**-0.5
sdpa = mx.fast.scaled_dot_product_attention


def per_step_ms(fn, args: list[tuple[mx.array, ...]], repeats: int = 20) -> float:
    mx.eval([fn(*a) for a in args])
    t0 = time.perf_counter()
    for _ in range(repeats):
        mx.eval([fn(*a) for a in args])
    return (time.perf_counter() - t0) / repeats * 1e3


def folded(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """One row's (1, H, 1, D) attention as (KV, H/KV, D) @ (KV, D, S), softmax, @ (KV, S, D)."""
    qf = q.reshape(KV_HEADS, HEADS // KV_HEADS, DIM) * SCALE
    scores = (qf @ k[0].swapaxes(-1, -2)).astype(mx.float32)
    weights = mx.softmax(scores, axis=-1, precise=True).astype(q.dtype)
    return (weights @ v[0]).reshape(1, HEADS, 1, DIM)


def with_mask(mask: mx.array | None):  # noqa: ANN201 - a small closure
    return lambda q, k, v: sdpa(q, k, v, scale=SCALE, mask=mask)


def layers(rows: int) -> list[tuple[mx.array, ...]]:
    args = [
        tuple(
            mx.random.normal(shape).astype(mx.bfloat16)
            for shape in (
                (rows, HEADS, 1, DIM),
                (rows, KV_HEADS, SPAN, DIM),
                (rows, KV_HEADS, SPAN, DIM),
            )
        )
        for _ in range(LAYERS)
    ]
    mx.eval(args)
    return args


def main() -> None:
    print(mx.default_device(), f"{SPAN} keys, ms per {LAYERS} layers")
    for rows in (1, 8, 32):
        args = layers(rows)
        lengths = mx.array([SPAN - 1 - (7 * i) % 200 for i in range(rows)])
        seen = (mx.arange(SPAN)[None, :] <= lengths[:, None])[:, None, None, :]
        additive = mx.where(seen, 0.0, -mx.inf).astype(mx.bfloat16)
        times = {
            "no mask": per_step_ms(with_mask(None), args),
            "bool mask": per_step_ms(with_mask(seen), args),
            "additive": per_step_ms(with_mask(additive), args),
        }
        if rows == 1:
            times["folded matmuls"] = per_step_ms(folded, args)
        print(f"rows {rows}: " + ", ".join(f"{name} {ms:.2f}" for name, ms in times.items()))


if __name__ == "__main__":
    main()
