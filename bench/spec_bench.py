"""Speculative decoding in the batched engine: tokens/s with and without each drafter.

    .venv/bin/python bench/spec_bench.py                      # CPU: builds a "small" Qwen3
    .venv/bin/python bench/spec_bench.py --model CKPT --draft-model SMALL_CKPT \\
        --concurrency 1,8 --max-tokens 128 --kinds none,ngram,draft,eagle3   # e.g. on an H100

Two prompts: a repetitive extraction prompt (a table of records the answer should copy from)
and a free-form one. Drafters: `none`, `ngram` (prompt lookup), `draft` (--draft-model; default
a copy of the target, which is always right: acceptance 1 shows the mechanics' upper bound,
not a real speed-up, since drafting costs k target-sized passes), `eagle3` (--eagle3-model;
default a random head generated for the target, which is almost always wrong: it shows the
cost of drafting). Random weights make real acceptance meaningless, so each row reports the
acceptance and tokens per target step it measured next to tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from services.decoder.engine import DecoderEngine, Delta, EngineRequest
from shared.api import build_messages, load
from shared.runtime import mlx_thread

EXTRACT = (
    "Records:\n"
    + "".join(
        f"id={i:03d} name=Customer {i} city=Lisbon status=active plan=gold\n" for i in range(12)
    )
    + "List every record above exactly as written, one per line."
)
FREE = "Write a long story about a lighthouse keeper and the sea, with many details."


def build_target(size: str, root: Path) -> Path:
    from shared.testing.fixtures import make_checkpoint  # needs the test extras

    return make_checkpoint("qwen3", root / f"qwen3-{size}", "hf", dtype="float32", size=size)


def build_eagle3(target: Path, root: Path) -> Path:
    from shared.models.eagle3.random import make_eagle3

    config = json.loads((target / "config.json").read_text())
    return make_eagle3(root / "eagle3", config, "speculators")


async def run(engine: DecoderEngine, prompts: list, max_tokens: int) -> float:
    """Decode tokens/s: tokens after every stream has its first one, over that window (so
    prefill, which drafting does not change, stays out of the number)."""

    async def one(i: int, prompt) -> list[float]:
        req = EngineRequest(f"b{i}", prompt, max_tokens=max_tokens, ignore_eos=True)
        times: list[float] = []
        async for event in engine.submit(req):
            if isinstance(event, Delta):
                times += [time.perf_counter()] * len(event.token_ids)
        return times

    streams = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    start = max(t[0] for t in streams)
    end = max(t[-1] for t in streams)
    tokens = sum(1 for t in streams for x in t if x > start)
    return tokens / (end - start) if end > start else 0.0


def measure(model, kind: str, drafts: dict[str, str], prompts: list, args) -> dict:
    kwargs: dict = {}
    if kind != "none":
        kwargs = dict(draft_kind=kind, draft_model=drafts.get(kind, ""), num_draft_tokens=args.k)
    engine = DecoderEngine(model, "bench", max_num_seqs=max(len(prompts), 1), **kwargs)
    engine.start()
    try:
        asyncio.run(run(engine, prompts[:1], 4))  # warm-up (compiles, allocates)
        spec = engine.core.spec
        base = (spec.steps, spec.drafted, spec.accepted)
        rate = asyncio.run(run(engine, prompts, args.max_tokens))
        steps, drafted, accepted = (
            spec.steps - base[0], spec.drafted - base[1], spec.accepted - base[2]
        )  # fmt: skip
    finally:
        engine.shutdown()
    return {
        "decode tok/s": round(rate, 1),
        "acceptance": round(accepted / drafted, 3) if drafted else None,
        "tokens/step": round(1 + accepted / steps, 2) if steps else None,
    }


def width_probe(lm, widths: tuple[int, ...] = (1, 2, 3, 5), context: int = 100) -> dict:
    """ms per batched forward pass of one row feeding `width` tokens after `context` cached
    ones: what a verification step costs against a plain decode step on this device."""
    import mlx.core as mx
    import numpy as np

    from shared.models.batch_cache import make_batch_caches

    layout, caches = make_batch_caches(len(lm.layers))
    cache = lm.make_cache()
    lm(mx.array([list(range(context))]), cache)
    layout.reserve(0, context, 1)
    for batch_cache, own in zip(caches, cache, strict=True):
        batch_cache.insert(0, *own.state)
    lengths, out = np.array([context]), {}
    for width in widths:
        tokens = mx.zeros((1, width), mx.int32)
        pos = mx.array((lengths[:, None] + np.arange(width)).astype(np.int32))
        for i in range(23):  # 3 warm-up calls, then 20 timed
            if i == 3:
                start = time.perf_counter()
            layout.begin(lengths, 1, width)
            mx.eval(lm(tokens, caches, position_ids=pos))
        out[f"width {width} ms"] = round((time.perf_counter() - start) / 20 * 1e3, 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="target checkpoint (default: a random 'small' Qwen3, fp32)")
    p.add_argument("--size", default="small", help="size of the generated target")
    p.add_argument("--draft-model", help="draft-model checkpoint (default: the target itself)")
    p.add_argument("--eagle3-model", help="EAGLE-3 head (default: a random one for the target)")
    p.add_argument("--kinds", default="none,ngram,draft,eagle3")
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=4, help="--num-draft-tokens")
    p.add_argument("--width-probe", action="store_true", help="also time 1..5-token steps")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="spec-bench-"))
    target = Path(args.model) if args.model else build_target(args.size, root)
    kinds = args.kinds.split(",")
    drafts = {"draft": args.draft_model or str(target)}
    if "eagle3" in kinds:
        drafts["eagle3"] = args.eagle3_model or str(build_eagle3(target, root))
    model = mlx_thread.run_sync(lambda: load(target, components=["language"]))
    print(json.dumps({"target": str(target), "k": args.k, "max_tokens": args.max_tokens}))
    if args.width_probe:
        print(json.dumps(mlx_thread.run_sync(width_probe, model.language)), flush=True)
    for name, text in (("extraction", EXTRACT), ("free-form", FREE)):
        for c in (int(x) for x in args.concurrency.split(",")):
            prompts = [model.processor(build_messages(f"{text} #{i}")) for i in range(c)]
            for kind in kinds:
                row = {"prompt": name, "streams": c, "drafter": kind}
                print(json.dumps(row | measure(model, kind, drafts, prompts, args)), flush=True)


if __name__ == "__main__":
    main()
