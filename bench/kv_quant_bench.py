"""KV cache quantization: bytes per token, streams that fit, and decode tok/s.

    python bench/kv_quant_bench.py                       # CPU: small shapes, table + decode
    python bench/kv_quant_bench.py --arch qwen2.5-7b --weight-bits 4 --streams 1,8,32 \
        --context 32768 --steps 32                       # the 7B architecture (H100)

1. The table (pure arithmetic, `KVQuantConfig.bytes_per_token`): for the Qwen2.5-7B
   architecture (28 layers, 4 KV heads, head_dim 128, bf16 activations) the KV bytes per
   token of each scheme, the KV of one `--table-context` stream, and how many such streams fit
   in `--budget-gib` of KV memory (what admission with --kv-cache-memory-mb would allow).
2. Decode throughput: a random-weight model (`--arch`), N streams whose slots are filled with
   `--context` tokens of random keys/values (inserted through the scheme's `insert`, so no
   prefill is timed), then `--steps` batched greedy decode steps per scheme; prints tok/s
   (N x steps / wall, the best of --repeats windows) and the KV memory the slots hold.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from shared.models.kv_quant import KVQuantConfig, make_batch_caches
from shared.models.transformer import Model, TransformerArgs

ARCHS = {
    "small": dict(
        hidden_size=512, num_hidden_layers=4, intermediate_size=1408, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, vocab_size=1024,
    ),
    "qwen2.5-7b": dict(
        hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, num_attention_heads=28,
        num_key_value_heads=4, head_dim=128, vocab_size=152064,
    ),
}  # fmt: skip
SCHEMES = {
    "fp": KVQuantConfig(),
    "u8": KVQuantConfig(8),
    "u4": KVQuantConfig(4),
    "tq4": KVQuantConfig(4, "turboquant"),
    "tq3.5": KVQuantConfig(3.5, "turboquant"),
    "tq3": KVQuantConfig(3, "turboquant"),
    "tq2.5": KVQuantConfig(2.5, "turboquant"),
}


def table(context: int, budget_gib: float) -> None:
    a = ARCHS["qwen2.5-7b"]
    layers, n_kv, d = a["num_hidden_layers"], a["num_key_value_heads"], a["head_dim"]
    print(f"Qwen2.5-7B KV ({layers} layers x {n_kv} KV heads x head_dim {d}, bf16), ", end="")
    print(f"{context} tokens per stream, {budget_gib:g} GiB of KV:")
    print("| scheme | bytes/token | bits/value | GiB/stream | streams | x fp |")
    print("|---|---|---|---|---|---|")
    fp = KVQuantConfig().bytes_per_token(layers, n_kv, d, 2)
    for name, cfg in SCHEMES.items():
        per = cfg.bytes_per_token(layers, n_kv, d, 2)
        bits = 8 * per / (layers * n_kv * 2 * d)
        stream = per * context / 2**30
        streams = int(budget_gib * 2**30 // (per * context))
        print(f"| {name} | {per} | {bits:.2f} | {stream:.3f} | {streams} | {fp / per:.2f} |")


def build(arch: str, weight_bits: int, dtype: mx.Dtype) -> Model:
    model = Model(TransformerArgs(model_type="qwen2", rope_theta=1e6, **ARCHS[arch]))
    model.set_dtype(dtype)
    if weight_bits:
        nn.quantize(model, group_size=64, bits=weight_bits)
    mx.eval(model.parameters())
    return model


def decode(
    model: Model, cfg: KVQuantConfig, streams: int, context: int, steps: int, repeats: int
) -> tuple[float, float]:
    """(tok/s, KV GiB): the best of `repeats` runs of `steps` batched decode steps over
    `streams` rows of `context` tokens."""
    args, dtype = model.args, model.model.norm.weight.dtype
    layout, caches = make_batch_caches(len(model.layers), cfg)
    shape = (1, args.num_key_value_heads, context, args.head_dim)
    for slot in range(streams):
        layout.reserve(slot, context, streams)
        for cache in caches:
            k = mx.random.normal(shape).astype(dtype)
            cache.insert(slot, k, mx.random.normal(shape).astype(dtype))
        mx.eval([c.state for c in caches])
    kv_gib = sum(c.nbytes for c in caches) / 2**30
    lengths = np.full(streams, context, np.int64)
    tokens = mx.zeros((streams,), mx.int32)

    def step() -> None:
        nonlocal tokens
        layout.begin(lengths, streams)
        pos = mx.array(lengths.astype(np.int32))[:, None]
        logits = model(tokens[:, None], caches, position_ids=pos)[:, -1]
        tokens = mx.argmax(logits, axis=-1).astype(mx.int32)
        mx.eval(tokens)
        lengths[:] += 1

    step(), step()  # warm-up
    best = float("inf")  # the best of `repeats` windows: other load only ever slows a window
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, time.perf_counter() - start)
    return streams * steps / best, kv_gib


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", choices=ARCHS, default="small")
    p.add_argument("--weight-bits", type=int, default=0, help="quantize the weights (0: off)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    p.add_argument("--streams", default="1,8", help="comma-separated stream counts")
    p.add_argument("--context", type=int, default=1024, help="KV tokens per stream (decode)")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed windows; the best counts")
    p.add_argument("--schemes", default="fp,u8,u4,tq4,tq3.5,tq3")
    p.add_argument("--table-context", type=int, default=32768)
    p.add_argument("--budget-gib", type=float, default=60.0, help="KV memory for the table")
    p.add_argument("--no-decode", action="store_true", help="print the table only")
    args = p.parse_args()
    table(args.table_context, args.budget_gib)
    if args.no_decode:
        return
    print(
        f"\ndecode: {args.arch}, weights {args.weight_bits or args.dtype}, {args.dtype} KV ", end=""
    )
    print(
        f"activations, {args.context} tokens per stream, {args.steps} steps, {mx.default_device()}"
    )
    model = build(args.arch, args.weight_bits, getattr(mx, args.dtype))
    print("| scheme | streams | tok/s | KV GiB | x fp tok/s |")
    print("|---|---|---|---|---|")
    for n in (int(s) for s in args.streams.split(",")):
        base = None
        for name in args.schemes.split(","):
            tps, gib = decode(model, SCHEMES[name], n, args.context, args.steps, args.repeats)
            base = base or tps
            print(f"| {name} | {n} | {tps:.1f} | {gib:.3f} | {tps / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
