"""EAGLE-3 drafting: checkpoints in the published layouts (generated here, random weights) load
and draft in the batch; greedy output is token-identical to no drafting; and every draft the
batch proposes equals the head run from scratch over the target's captured states."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from services.decoder.engine import DecoderEngine, EngineRequest
from services.decoder.spec import detect_kind
from services.decoder.spec.eagle3 import Eagle3Proposer
from shared.api import load
from shared.models.eagle3 import load_eagle3
from shared.models.eagle3.random import make_eagle3
from shared.runtime import mlx_thread
from tests.engine_support import start_and_run

K = 3
TEXTS = ["the cat sat on the mat. the cat", "Tell me about the fox.", "a b c a b c", "Why? " * 5]


@pytest.fixture(scope="module")
def target(checkpoint_factory, tmp_path_factory):
    path = checkpoint_factory("qwen3", "hf")
    model = mlx_thread.run_sync(lambda: load(path, components=["language"]))
    prompts = [model.processor([{"role": "user", "content": t}]) for t in TEXTS]
    cfg = json.loads((Path(path) / "config.json").read_text())
    root = tmp_path_factory.mktemp("eagle3")
    heads = {name: make_eagle3(root / name, cfg, name) for name in ("speculators", "eagle")}
    return model, prompts, heads


class Recording(Eagle3Proposer):
    """Keeps (history, drafts) of every drafting row, to check against a from-scratch run."""

    log: list[tuple[list[int], list[int]]]

    def propose(self, rows, caps, index, seeds, temps):
        prop = super().propose(rows, caps, index, seeds, temps)
        drafts = np.array(prop.drafts)
        for i, row in enumerate(rows):
            if prop.counts[i]:
                self.log.append((list(row.history), drafts[i].tolist()))
        return prop


def run(model, prompts, **kwargs) -> tuple[list[list[int]], DecoderEngine]:
    engine = DecoderEngine(model, "t", max_num_seqs=8, max_num_batched_tokens=64, **kwargs)
    if isinstance(engine.core.drafter, Eagle3Proposer):
        engine.core.drafter.__class__ = Recording
        engine.core.drafter.log = []
    requests = [
        EngineRequest(f"r{i}", p, max_tokens=10 + 2 * i, ignore_eos=True)
        for i, p in enumerate(prompts)
    ]
    return start_and_run(engine, requests), engine


def scratch_drafts(model, head, history: list[int], k: int) -> list[int]:
    """The head alone over the whole history: target states at positions [0, T - 1) paired
    with tokens [1, T), then k - 1 steps on its own outputs (no batch, no rollback)."""
    lm = model.language
    lm.model.capture(head.args.aux_layers(len(lm.layers)))
    lm(mx.array([history]), lm.make_cache())
    features = head.fuse(mx.concatenate(lm.model.captured, axis=-1))[:, :-1]
    embed = head.embed_tokens if "embed_tokens" in head else lm.embed
    cache = head.make_cache()
    logits, h = head(embed(mx.array([history[1:]])), features, cache)
    out = []
    for _ in range(k):
        token = head.to_target(mx.argmax(logits[:, -1], axis=-1))
        out.append(int(token.item()))
        logits, h = head(embed(token[:, None]), h[:, -1:], cache)
    return out


@pytest.mark.parametrize("layout", ["speculators", "eagle"])
def test_eagle3_drafts_in_the_batch_and_changes_nothing(target, layout):
    model, prompts, heads = target
    path = str(heads[layout])
    assert detect_kind("", path) == "eagle3"  # --draft-kind detected from the config
    want, _ = run(model, prompts)
    got, engine = run(model, prompts, draft_model=path, num_draft_tokens=K)
    assert got == want
    drafter = engine.core.drafter
    spec = engine.core.spec
    assert spec.drafted > 0 and drafter.log
    head = mlx_thread.run_sync(load_eagle3, path)
    for history, drafts in drafter.log:
        assert drafts == mlx_thread.run_sync(scratch_drafts, model, head, history, K)


def test_eagle3_checkpoint_that_does_not_fit_the_target_is_refused(target, tmp_path):
    model, _, _ = target
    bad = make_eagle3(tmp_path / "bad", {"hidden_size": 32, "vocab_size": 300,
                                         "num_hidden_layers": 2}, "speculators")  # fmt: skip
    with pytest.raises(ValueError, match="target hidden size"):
        DecoderEngine(model, "t", draft_model=str(bad))


def test_eagle3_with_images(checkpoint_factory, tmp_path):
    """A VLM target: the head reads states computed from image features at image positions."""
    from PIL import Image

    from shared.runtime.generate import encode_media

    path = checkpoint_factory("qwen2_5_vl", "hf")
    config = json.loads((Path(path) / "config.json").read_text())
    head = make_eagle3(tmp_path / "head", config, "speculators")

    def build() -> tuple:
        full = load(path)
        out = []
        for i, size in enumerate([(56, 56), (84, 56)]):
            pixels = np.random.default_rng(i).integers(0, 255, (*size[::-1], 3), np.uint8)
            parts = [{"type": "image", "image": Image.fromarray(pixels)}]
            parts.append({"type": "text", "text": "Describe it. " * (i + 1)})
            prompt = full.processor([{"role": "user", "content": parts}])
            features = encode_media(full, prompt.media)
            mx.eval([f.tensors() for f in features])
            out.append((prompt, features))
        return load(path, components=["language"]), out

    model, built = mlx_thread.run_sync(build)

    def go(**kwargs) -> tuple[list[list[int]], DecoderEngine]:
        engine = DecoderEngine(model, "vl", max_num_seqs=4, max_num_batched_tokens=64, **kwargs)
        requests = [
            EngineRequest(f"v{i}", p, list(f), max_tokens=12, ignore_eos=True)
            for i, (p, f) in enumerate(built)
        ]
        return start_and_run(engine, requests), engine

    want, _ = go()
    got, engine = go(draft_model=str(head), num_draft_tokens=K)
    assert got == want and engine.core.spec.drafted > 0
