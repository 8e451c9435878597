"""Quantized vs bf16 matmul time by batch rows on the current MLX device (a #10 probe).

    python bench/qmm_probe.py [--rows 1,2,4,8,16,32,64] [--iters 50]

One decode step multiplies every linear layer's weight by (rows, hidden) activations. This
times `mx.quantized_matmul` (4-bit, group 64, affine: what mlx-community 4-bit checkpoints use)
and a plain bf16 matmul for the Qwen2.5-7B MLP shapes, per row count, and prints the time per
call and the effective weight bandwidth.
"""

from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx


def timed(fn, iters: int) -> float:
    for _ in range(3):
        mx.eval(fn())
    start = time.perf_counter()
    outs = [fn() for _ in range(iters)]
    mx.eval(outs)
    return (time.perf_counter() - start) / iters


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="1,2,4,8,16,32,64")
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args()
    out_dim, in_dim = 18944, 3584  # gate/up projection of Qwen2.5-7B
    w = mx.random.normal((out_dim, in_dim)).astype(mx.bfloat16) * 0.02
    wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
    mx.eval(w, wq, scales, biases)
    qbytes = wq.nbytes + scales.nbytes + biases.nbytes
    rows_out = []
    for rows in [int(r) for r in args.rows.split(",")]:
        x = mx.random.normal((rows, in_dim)).astype(mx.bfloat16)
        mx.eval(x)
        tq = timed(lambda x=x: mx.quantized_matmul(x, wq, scales, biases, True, 64, 4), args.iters)
        tb = timed(lambda x=x: x @ w.T, args.iters)
        rows_out.append({
            "rows": rows, "q4_us": round(tq * 1e6, 1), "bf16_us": round(tb * 1e6, 1),
            "q4_GBps": round(qbytes / tq / 1e9, 1), "bf16_GBps": round(w.nbytes / tb / 1e9, 1),
        })  # fmt: skip
        print(json.dumps(rows_out[-1]), flush=True)
    print(json.dumps({"device": str(mx.default_device()), "results": rows_out}))


if __name__ == "__main__":
    main()
