"""Where a batched decode step's time goes (issue #10), piece by piece, at several batch sizes.

    python bench/step_profile.py --model CKPT --rows 1,8,32 --context 512 --steps 20

Loads only the language model of CKPT (any supported checkpoint; on the H100 the random
Qwen2.5-VL-7B one from `bench/device_checkpoint.py`), fills `rows` slots of the decoder's slot
cache (`shared.models.batch_cache`) with `--context` random tokens of KV, and times, per step
(mx.eval after each, the best mean of `--repeats` windows of `--steps` steps):

- `step`: what `BatchRunner.decode` queues: layout + the LM over the slot cache + argmax
- `no_kv`: the same LM call without a cache (weights, norms, rope, 1-token attention): the
  part of a step that does not depend on the context
- `sdpa_mask` / `sdpa_plain`: one layer's attention alone at the step's shapes, with the
  slot cache's boolean mask and without a mask, times the layer count
- `scatter`: one layer's two KV scatters alone, times the layer count
- `head`: the final norm + LM head + argmax alone

The difference between `step` and `no_kv` is what attending over the slot cache costs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from shared.api import load
from shared.models.batch_cache import make_batch_caches


def timed(fn: Callable[[], mx.array], steps: int, repeats: int) -> float:
    """Best mean seconds per call of `fn` (evaluated each call) over `repeats` windows."""
    mx.eval(fn())  # warm up: kernels for these shapes
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            mx.eval(fn())
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def fill(caches: list, rows: int, context: int, n_kv: int, head_dim: int, dtype: mx.Dtype) -> None:
    layout = caches[0].layout
    for slot in range(rows):
        layout.reserve(slot, context + 64, rows)
        for cache in caches:
            kv = mx.random.normal((1, n_kv, context, head_dim)).astype(dtype)
            cache.insert(slot, kv, kv)
    mx.eval([c.state for c in caches])


def profile(lm, rows: int, context: int, steps: int, repeats: int) -> dict[str, float]:
    n_layers, n_kv, head_dim = len(lm.layers), lm.n_kv_heads, lm.head_dim
    dtype = lm.model.norm.weight.dtype
    layout, caches = make_batch_caches(n_layers)
    fill(caches, rows, context, n_kv, head_dim, dtype)
    lengths = np.full(rows, context, np.int64)
    tokens = mx.zeros((rows, 1), mx.int32)
    positions = mx.array(lengths.astype(np.int32))[:, None]

    def step() -> mx.array:
        layout.begin(lengths, rows)  # same length every call: the cache never grows
        return mx.argmax(lm(tokens, caches, position_ids=positions)[:, -1, :], axis=-1)

    out = {"step": timed(step, steps, repeats)}
    out["no_kv"] = timed(lambda: mx.argmax(lm(tokens)[:, -1, :], axis=-1), steps, repeats)

    n_heads = lm.layers[0].self_attn.n_heads
    q = mx.random.normal((rows, n_heads, 1, head_dim)).astype(dtype)
    keys, values = (
        caches[0].keys[:rows, :, : context + 1],
        caches[0].values[:rows, :, : context + 1],
    )
    mask = layout.mask
    scale = head_dim**-0.5
    sdpa = mx.fast.scaled_dot_product_attention
    out["sdpa_mask"] = n_layers * timed(
        lambda: sdpa(q, keys, values, scale=scale, mask=mask), steps, repeats
    )
    out["sdpa_plain"] = n_layers * timed(lambda: sdpa(q, keys, values, scale=scale), steps, repeats)

    new = mx.random.normal((rows, n_kv, 1, head_dim)).astype(dtype)
    cache = caches[0]
    out["scatter"] = n_layers * timed(
        lambda: mx.stack(cache.update_and_fetch(new, new)), steps, repeats
    )

    h = mx.random.normal((rows, 1, lm.args.hidden_size)).astype(dtype)

    def head() -> mx.array:
        x = lm.model.norm(h)
        logits = (
            lm.model.embed_tokens.as_linear(x) if lm.args.tie_word_embeddings else lm.lm_head(x)
        )
        return mx.argmax(logits[:, -1, :], axis=-1)

    out["head"] = timed(head, steps, repeats)
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True)
    p.add_argument("--rows", default="1,8,32")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    model = load(args.model, components=("language",))
    lm = model.language
    print(f"{args.model}: {len(lm.layers)} layers, context {args.context}, {mx.default_device()}")
    cols = ("rows", "step", "no_kv", "step - no_kv", "sdpa_mask", "sdpa_plain", "scatter", "head")
    print("| " + " | ".join(cols) + " |  (ms per step)")
    print("|---|---|---|---|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        t = {
            k: v * 1e3 for k, v in profile(lm, rows, args.context, args.steps, args.repeats).items()
        }
        t["step - no_kv"] = t["step"] - t["no_kv"]
        print(f"| {rows} | " + " | ".join(f"{t[c]:.2f}" for c in cols[1:]) + " |", flush=True)


if __name__ == "__main__":
    main()
