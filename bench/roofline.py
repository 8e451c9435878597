"""Single-stream decode against the weight-bandwidth roofline (issue #10).

    python bench/roofline.py --model CKPT [--context 512] [--steps 64]

- bytes per step: every language-model weight a one-token step reads (packed 4-bit weights,
  scales and biases, norms, the LM head), with the embedding table counted as the one row a
  token reads;
- copy bandwidth: `y = x + 0` over a 2 GiB buffer (read + write), the best of 5;
- roofline step = bytes / bandwidth; measured step = one token through the LM with a KV cache
  of `--context` tokens, `mx.eval` per step (what the engine's decode does at one row);
- where the rest goes: the LM's matmuls timed alone (each projection once, same shapes), and
  the number of primitives in one step's graph (`mx.export_to_dot`), each of which is at
  least one kernel launch on MLX CUDA.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from step_profile import timed  # bench/: best mean seconds per evaluated call

from shared.api import load


def weight_bytes(lm: nn.Module) -> int:
    total = 0
    for name, value in tree_flatten(lm.parameters()):
        if "embed_tokens" in name:
            total += value.nbytes // value.shape[0]  # one row per token
        else:
            total += value.nbytes
    return total


def copy_bandwidth() -> float:
    x = mx.zeros((1 << 29,), mx.float32)  # 2 GiB
    mx.eval(x)
    seconds = timed(lambda: x + 0, steps=1, repeats=5)
    return 2 * x.nbytes / seconds


def matmul_time(lm: nn.Module) -> tuple[float, int]:
    """Seconds for every (quantized) linear layer of the LM once on one token, and how many."""
    layers = [m for _, m in lm.named_modules() if isinstance(m, nn.QuantizedLinear | nn.Linear)]
    dtype = lm.model.norm.weight.dtype  # the activations'
    inputs = [mx.random.normal((1, _in_dim(m))).astype(dtype) for m in layers]
    mx.eval(inputs)

    def all_layers() -> list[mx.array]:
        return [m(x) for m, x in zip(layers, inputs, strict=True)]

    return timed(all_layers, steps=10, repeats=5), len(layers)


def _in_dim(m: nn.Module) -> int:
    packed = 32 // m.bits if isinstance(m, nn.QuantizedLinear) else 1  # values per uint32
    return m.weight.shape[1] * packed


def graph_nodes(step) -> int | None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "step.dot")
        try:
            mx.export_to_dot(path, step())
        except Exception:  # noqa: BLE001 - an older MLX: leave it out
            return None
        with open(path) as f:
            return sum("shape=rectangle" in line for line in f)  # one per primitive


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=64)
    args = p.parse_args()
    lm = load(args.model, components=["language"]).language
    assert lm is not None
    print(f"device: {mx.default_device()}")
    nbytes, bw = weight_bytes(lm), copy_bandwidth()
    cache = lm.make_cache()
    mx.eval(lm(mx.zeros((1, args.context), mx.int32), cache))
    token = mx.zeros((1, 1), mx.int32)

    def step() -> mx.array:
        return mx.argmax(lm(token, cache)[:, -1, :], axis=-1)

    measured = timed(step, steps=args.steps, repeats=3)
    mm, n_mm = matmul_time(lm)
    nodes = graph_nodes(step)
    roof = nbytes / bw
    print(f"weights read per step: {nbytes / 2**30:.3f} GiB; copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"roofline step {roof * 1e3:.2f} ms ({1 / roof:.0f} tok/s)")
    print(f"measured step {measured * 1e3:.2f} ms ({1 / measured:.0f} tok/s)", end="")
    print(f", context {args.context}")
    print(f"fraction of roofline: {roof / measured:.2f}")
    print(f"the {n_mm} matmuls alone: {mm * 1e3:.2f} ms ({nbytes / mm / 1e12:.2f} TB/s effective)")
    print(f"everything else (attention, norms, rope, launches): {(measured - mm) * 1e3:.2f} ms")
    if nodes is not None:
        print(f"primitives in one step's graph: {nodes}")


if __name__ == "__main__":
    main()
