"""Speculative decoding at the edges: per-request options (gRPC -> engine), their 400s, the
usage and Stats counters, the gateway's Prometheus lines, and `prism generate --draft-*`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from prism.v1 import decoder_pb2

from services.decoder.engine import DecoderEngine, Delta, EngineRequest, Finish
from services.decoder.servicer import engine_options, to_proto
from services.gateway.metrics import GatewayMetrics
from shared.api import generate, load
from shared.errors import InvalidRequestError
from shared.runtime import mlx_thread

PRISM = str(Path(sys.executable).with_name("prism"))
PROMPT = "the cat sat on the mat. the cat sat on the mat. the cat"


@pytest.fixture(scope="module")
def target(checkpoint_factory):
    path = checkpoint_factory("qwen3", "hf")
    model = mlx_thread.run_sync(lambda: load(path, components=["language"]))
    return path, model, model.processor([{"role": "user", "content": PROMPT}])


def run(model, requests: list[EngineRequest], **kwargs) -> tuple[list, DecoderEngine]:
    engine = DecoderEngine(model, "t", max_num_seqs=4, max_num_batched_tokens=64, **kwargs)
    engine.start()

    async def go() -> list:
        handles = [engine.submit(r) for r in requests]
        out = []
        for h in handles:
            events = [e async for e in h]
            tokens = [t for e in events if isinstance(e, Delta) for t in e.token_ids]
            out.append((tokens, events[-1]))
        return out

    try:
        return asyncio.run(go()), engine
    finally:
        engine.shutdown()


def test_grpc_options_reach_the_engine():
    req = decoder_pb2.GenerateRequest(
        speculative=decoder_pb2.SpeculativeOptions(disable=True, num_draft_tokens=2)
    )
    options = engine_options(req)
    assert options["speculative"] is False and options["num_draft_tokens"] == 2
    assert engine_options(decoder_pb2.GenerateRequest())["speculative"] is True


def test_per_request_disable_and_draft_count(target):
    path, model, prompt = target

    def req(rid: str, **kw) -> EngineRequest:
        return EngineRequest(rid, prompt, max_tokens=16, ignore_eos=True, **kw)

    want, _ = run(model, [req("a")])
    kw = dict(draft_kind="draft", draft_model=str(path), num_draft_tokens=3)
    off, engine = run(model, [req("b", speculative=False)], **kw)
    assert off[0][0] == want[0][0] and engine.core.spec.drafted == 0
    one, engine = run(model, [req("c", num_draft_tokens=1)], **kw)
    spec = engine.core.spec
    assert one[0][0] == want[0][0] and spec.drafted == spec.steps > 0  # one draft per step
    finish = one[0][1]
    assert isinstance(finish, Finish) and finish.accepted_draft_tokens == spec.accepted > 0
    assert to_proto(finish).finish.usage.accepted_draft_tokens == spec.accepted
    stats = engine.stats()
    assert (stats.spec_num_drafts, stats.spec_num_draft_tokens) == (spec.steps, spec.drafted)
    assert stats.spec_num_accepted_tokens == spec.accepted


def test_too_many_draft_tokens_is_a_400(target):
    path, model, prompt = target
    engine = DecoderEngine(model, "t", draft_kind="ngram", num_draft_tokens=3)
    engine.start()

    async def go() -> None:
        engine.submit(EngineRequest("x", prompt, max_tokens=4, num_draft_tokens=9))

    try:
        with pytest.raises(InvalidRequestError, match="num_draft_tokens must be in"):
            asyncio.run(go())
    finally:
        engine.shutdown()


def test_gateway_reports_spec_decode_metrics():
    def decoder(drafts: int, drafted: int, accepted: int):
        stats = decoder_pb2.DecoderStatsResponse(
            spec_num_drafts_total=drafts, spec_num_draft_tokens_total=drafted,
            spec_num_accepted_tokens_total=accepted,
        )  # fmt: skip
        return SimpleNamespace(kind="decoder", healthy=True, models={"m": None}, stats=stats)

    metrics = GatewayMetrics()
    metrics.watch_decoders(lambda: [decoder(10, 40, 20), decoder(10, 40, 10)])
    text = metrics.render()[0].decode()
    assert 'prism:spec_decode_num_drafts_total{model_name="m"} 20.0' in text
    assert 'prism:spec_decode_num_draft_tokens_total{model_name="m"} 80.0' in text
    assert 'prism:spec_decode_num_accepted_tokens_total{model_name="m"} 30.0' in text
    assert 'prism:spec_decode_acceptance_rate{model_name="m"} 0.375' in text
    assert 'prism:spec_decode_tokens_per_step{model_name="m"} 2.5' in text


def test_prism_generate_with_prompt_lookup(target):
    path = str(target[0])
    args = [PRISM, "generate", "--model", path, "--prompt", PROMPT, "--max-tokens", "12"]
    proc = subprocess.run(
        [*args, "--draft-kind", "ngram", "--num-draft-tokens", "3", "--verbose"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == generate(load(path), PROMPT, max_tokens=12) + "\n"
    assert "Speculative: acceptance" in proc.stderr and "tokens per target step" in proc.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--draft-kind", "draft"], "needs --draft-model"),
        (["--draft-kind", "eagle3"], "needs --draft-model"),
        (["--draft-kind", "ngram", "--num-draft-tokens", "-1"], "must be >= 0"),
    ],
)
def test_bad_server_flags_are_refused_before_loading(flags, message, capsys):
    from services.decoder.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--model", "m", *flags])
    assert message in capsys.readouterr().err
    args = parse_args(["--model", "m", "--draft-kind", "ngram", "--num-draft-tokens", "2"])
    assert (args.draft_kind, args.num_draft_tokens) == ("ngram", 2)
