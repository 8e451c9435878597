"""Qwen2-VL language model (Qwen2 + M-RoPE) in MLX against transformers' `Qwen2VLTextModel`.

The prompt has an "image" region whose temporal/height/width positions differ, laid out as
transformers' `get_rope_index` does; decoding continues at `cache length + rope_delta`.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig  # noqa: E402
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel  # noqa: E402

from shared.models.base import LanguageModel  # noqa: E402
from shared.models.qwen2_vl.language import LanguageModel as QwenVLLanguage  # noqa: E402
from shared.models.qwen2_vl.language import TextArgs  # noqa: E402

TOL = 1e-4
N_NEW = 32
SECTION = [2, 3, 3]  # head_dim 16 -> 8 frequency bands
CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
    initializer_range=0.2,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def rel_err(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def image_prompt_positions() -> tuple[np.ndarray, int]:
    """(3, L) positions for 3 text tokens, a 1x4x6 image grid (merged 2x2 -> 2x3 = 6 tokens),
    then 7 text tokens; and the decode-time delta (max position + 1 - L)."""
    text_before, (t, h, w), text_after = 3, (1, 2, 3), 7
    rows = [np.tile(np.arange(text_before), (3, 1))]
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    rows.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + text_before)
    start = rows[-1].max() + 1
    rows.append(np.tile(np.arange(start, start + text_after), (3, 1)))
    positions = np.concatenate(rows, axis=1)
    return positions, int(positions.max() + 1 - positions.shape[1])


class TorchQwenVLText(torch.nn.Module):
    """transformers' Qwen2-VL text decoder plus an untied LM head (what the VLM runs)."""

    def __init__(self, config: Qwen2VLTextConfig) -> None:
        super().__init__()
        self.model = Qwen2VLTextModel(config)
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        torch.nn.init.normal_(self.lm_head.weight, std=config.initializer_range)

    def forward(self, ids: torch.Tensor, position_ids=None, cache=None) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=position_ids, cache=cache, use_cache=True)
        return self.lm_head(out.last_hidden_state)


@pytest.fixture(scope="module")
def pair():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared machine; tiny model
    torch.manual_seed(0)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": SECTION}
    config = Qwen2VLTextConfig(**CONFIG, rope_parameters=rope)
    hf = TorchQwenVLText(config).eval()
    model = QwenVLLanguage(TextArgs.from_dict(config.to_dict()))
    weights = {k: mx.array(v.detach().numpy()) for k, v in hf.state_dict().items()}
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    mx.eval(model.parameters())
    yield hf, model
    torch.set_num_threads(threads)


def prompt() -> np.ndarray:
    positions, _ = image_prompt_positions()
    return np.random.default_rng(1).integers(0, CONFIG["vocab_size"], size=positions.shape[1])


def hf_greedy(hf, ids: np.ndarray, positions: np.ndarray, delta: int) -> tuple[list[int], float]:
    """Greedy decode with a KV cache, positions = cache length + delta on all three axes.
    Also returns the smallest top-2 logit margin seen (to rule out near-ties)."""
    cache = DynamicCache(config=hf.model.config)
    with torch.no_grad():
        logits = hf(torch.tensor(ids)[None], torch.tensor(positions)[:, None], cache)[0, -1]
        tokens, margin = [], float("inf")
        for _ in range(N_NEW):
            top = torch.topk(logits, 2)
            margin = min(margin, float(top.values[0] - top.values[1]))
            tokens.append(int(top.indices[0]))
            pos = torch.full((3, 1, 1), cache.get_seq_length() + delta)
            logits = hf(torch.tensor([[tokens[-1]]]), pos, cache)[0, -1]
    return tokens, margin


def mlx_greedy(model, ids: np.ndarray, positions: np.ndarray, delta: int, rows: int) -> list[int]:
    """`rows` = 3 passes (3, B, 1) decode positions, 1 passes (B, 1) (the fast path)."""
    cache = model.make_cache()
    logits = model(mx.array(ids)[None], cache, position_ids=mx.array(positions)[:, None])
    tokens = []
    for _ in range(N_NEW):
        tokens.append(int(mx.argmax(logits[0, -1]).item()))
        pos = mx.full((rows, 1, 1) if rows == 3 else (1, 1), cache[0].offset + delta, mx.int32)
        logits = model(mx.array([[tokens[-1]]]), cache, position_ids=pos)
    return tokens


def test_prefill_logits_with_mrope_positions(pair) -> None:
    hf, model = pair
    assert isinstance(model, LanguageModel)
    ids = prompt()
    positions, _ = image_prompt_positions()
    assert not (positions[0] == positions[1]).all()  # rows really differ
    with torch.no_grad():
        expected = hf(torch.tensor(ids)[None], torch.tensor(positions)[:, None])[0].numpy()
    ours = np.array(model(mx.array(ids)[None], position_ids=mx.array(positions)[:, None])[0])
    err = rel_err(ours, expected)
    print(f"qwen2_vl M-RoPE prefill logits rel err {err:.2e}")
    assert err <= TOL
    # The image positions matter: treating the prompt as plain text gives other logits.
    as_text = np.array(model(mx.array(ids)[None])[0])
    assert rel_err(as_text, expected) > 1e-2


def test_text_only_positions_default(pair) -> None:
    hf, model = pair
    ids = prompt()
    with torch.no_grad():
        expected = hf(torch.tensor(ids)[None])[0].numpy()
    assert rel_err(np.array(model(mx.array(ids)[None])[0]), expected) <= TOL
    # (B, L) positions mean "all three rows equal", as in transformers.
    pos2d = mx.arange(len(ids))[None]
    assert rel_err(np.array(model(mx.array(ids)[None], position_ids=pos2d)[0]), expected) <= TOL


def test_greedy_decode_with_rope_delta(pair) -> None:
    hf, model = pair
    ids = prompt()
    positions, delta = image_prompt_positions()
    assert delta < 0  # the image compresses positions, so decode positions lag the cache
    expected, margin = hf_greedy(hf, ids, positions, delta)
    assert margin > 1e-3, f"near-tie (margin {margin})"
    assert len(set(expected)) > 1
    assert mlx_greedy(model, ids, positions, delta, rows=3) == expected
    assert mlx_greedy(model, ids, positions, delta, rows=1) == expected


def test_chunked_prefill_with_mrope(pair) -> None:
    _, model = pair
    ids = mx.array(prompt())[None]
    positions = mx.array(image_prompt_positions()[0])[:, None]
    full = np.array(model(ids, position_ids=positions)[0])
    cache = model.make_cache()
    first = model(ids[:, :5], cache, position_ids=positions[..., :5])[0]
    second = model(ids[:, 5:], cache, position_ids=positions[..., 5:])[0]
    assert rel_err(np.concatenate([np.array(first), np.array(second)]), full) <= TOL


def test_transformers4_config_style() -> None:
    v4 = {
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 32,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": SECTION},
        "tie_word_embeddings": True,
    }
    v5 = dict(v4, rope_theta=None, rope_scaling=None)
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": SECTION}
    a, b = TextArgs.from_dict(v4), TextArgs.from_dict(v5)
    assert a.mrope_section == b.mrope_section == tuple(SECTION)
    assert mx.array_equal(a.make_rope().inv_freq, b.make_rope().inv_freq)
    assert (a.qkv_bias, a.o_bias, a.head_dim) == (True, False, 16)
    model = QwenVLLanguage(a)
    assert "lm_head" not in model
    weights = {"lm_head.weight": mx.zeros((32, 64)), "model.rotary_emb.inv_freq": mx.zeros(8)}
    assert model.sanitize(weights) == {}
