"""Start-up warm-up: meet the batch shapes serving will meet before the decoder says ready.

MLX CUDA builds a kernel the first time a shape class needs it (NVRTC, then the driver's JIT;
both cache on disk afterwards). On a fresh H100 the first burst of 32 streams stalled ~37 s in
prefill while that happened, after 1 and 8 streams had run fine (bench/NOTES.md, "The first
32-stream stall"); the whole warm-up takes ~110 s on a fresh machine, seconds after. vLLM runs
dummy batches at start-up for the same reason. Here the real engine serves, for each batch size
1, 2, 4, ... up to `max_num_seqs`, that many short dummy requests at once (half greedy, half
sampled with top-k/top-p), then single prompts of a few lengths up to the step's token budget,
two tokens each; then its counters are reset. Dummy requests carry no prefix keys, so the
prefix cache never sees them.
"""

from __future__ import annotations

import asyncio
import time

import mlx.core as mx
import structlog

from services.decoder.engine import DecoderEngine, EngineRequest
from shared.media.types import ProcessedPrompt
from shared.runtime.sampling import SamplingParams

log = structlog.get_logger("decoder")

PROMPT_TOKENS = 24  # the batch rounds' prompts: the prefill path (chunk + last token), cheap
LONG_PROMPTS = (96, 384, 2048)  # then one prompt each, up to the step budget: the matmul kernels
# are built per range of rows, and on a fresh H100 the first 427-token chunk stalled 32 s


def wanted(mode: str) -> bool:
    """--warmup auto: only where kernels are built per shape at run time (a GPU backend)."""
    return mode == "on" or (mode == "auto" and mx.default_device() == mx.gpu)


def batch_sizes(max_num_seqs: int) -> list[int]:
    sizes, n = [], 1
    while n < max_num_seqs:
        sizes.append(n)
        n *= 2
    return [*sizes, max_num_seqs]


def _request(i: int, vocab: int, length: int = PROMPT_TOKENS) -> EngineRequest:
    ids = [(7 * i + 3 * j + 1) % vocab for j in range(length)]
    sampled = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=i)
    return EngineRequest(
        f"warmup-{i}",
        ProcessedPrompt(ids),
        sampling=sampled if i % 2 else SamplingParams(),
        max_tokens=2,
        ignore_eos=True,
    )


async def _drain(engine: DecoderEngine, request: EngineRequest) -> None:
    async for _ in engine.submit(request):
        pass


async def warm_up(engine: DecoderEngine) -> float:
    """Run the dummy batches; seconds spent (logged)."""
    start = time.perf_counter()
    vocab, cfg = engine.vocab_size, engine.config
    sizes = batch_sizes(min(cfg.max_num_seqs, cfg.max_waiting))  # more would be refused
    for n in sizes:
        await asyncio.gather(*(_drain(engine, _request(i, vocab)) for i in range(n)))
    longest = min(cfg.max_num_batched_tokens, cfg.max_model_len - 2)
    lengths = sorted({min(n, longest) for n in LONG_PROMPTS})
    for length in lengths:
        await _drain(engine, _request(0, vocab, length))
    engine.core.totals = [0, 0, 0]  # the stats count clients' requests only
    seconds = time.perf_counter() - start
    log.info(
        "decoder_warmed_up", seconds=round(seconds, 2), batch_sizes=sizes, prompt_lengths=lengths
    )
    return seconds
