"""The decoder engine alone (no gRPC, no gateway): N concurrent greedy streams, in-process.

    python bench/engine_bench.py --model CKPT --concurrency 1,8,32 --max-tokens 128

Separates the engine's own throughput from the services' overhead: compare with
bench/serve_vs_mlx_vlm.py on the same checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from services.decoder.engine import DecoderEngine, Delta, EngineRequest
from shared.api import build_messages, load
from shared.runtime import mlx_thread

PROMPT = "Write a long story about a lighthouse keeper and the sea, with many details. #{}"


async def one(engine: DecoderEngine, prompt, max_tokens: int) -> tuple[float, list[float], int]:
    start = time.perf_counter()
    arrivals: list[float] = []
    handle = engine.submit(EngineRequest("b", prompt, max_tokens=max_tokens, ignore_eos=True))
    async for event in handle:
        if isinstance(event, Delta):
            arrivals += [time.perf_counter()] * len(event.token_ids)
    return start, arrivals, len(arrivals)


async def level(engine: DecoderEngine, prompts: list, max_tokens: int) -> dict[str, float]:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(engine, p, max_tokens) for p in prompts))
    wall = time.perf_counter() - t0
    ttft = [arr[0] - start for start, arr, _ in results if arr]
    itl = [b - a for _, arr, _ in results for a, b in zip(arr, arr[1:], strict=False)]
    tokens = sum(n for *_, n in results)
    return {
        "tok/s": tokens / wall,
        "ttft_p50": statistics.median(ttft),
        "ttft_max": max(ttft),
        "itl_p50_ms": 1e3 * statistics.median(itl) if itl else 0.0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args()
    model = mlx_thread.run_sync(lambda: load(args.model, components=["language"]))
    engine = DecoderEngine(model, "bench")
    engine.start()
    try:
        for c in (int(x) for x in args.concurrency.split(",")):
            prompts = [model.processor(build_messages(PROMPT.format(i))) for i in range(c)]
            asyncio.run(level(engine, prompts[:1], 8))  # warm-up
            row = asyncio.run(level(engine, prompts, args.max_tokens))
            print(f"c={c:3d} " + " ".join(f"{k}={v:.3f}" for k, v in row.items()), flush=True)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
