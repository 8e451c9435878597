"""KV quantization building blocks, without a model: the TurboQuant codebook and rotation,
code packing, the window's slot map, each codec against plain attention, the byte formula
against the caches' real buffers, and config errors."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from shared.models.batch_cache import BatchLayout
from shared.models.kv_quant import BatchQuantCache, KVQuantConfig, QuantKVCache, make_codec
from shared.models.kv_quant.batch import WindowLayout
from shared.models.kv_quant.codebook import MAX_1960_MSE, PAPER_MSE, expected_mse, lloyd_max
from shared.models.kv_quant.packing import pack, unpack
from shared.models.kv_quant.rotation import rotation, rotation_matrix
from shared.models.kv_quant.turboquant import TurboQuantizer
from shared.models.kv_quant.window import Window

SCHEMES = [
    KVQuantConfig(8),
    KVQuantConfig(4),
    KVQuantConfig(4, group_size=32),
    KVQuantConfig(4, "turboquant"),
    KVQuantConfig(3.5, "turboquant"),
    KVQuantConfig(3, "turboquant"),
    KVQuantConfig(2, "turboquant"),
]


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_codebook_mse_matches_the_paper(bits):
    """Lloyd-Max on N(0, 1) gives Max's distortions (to 1e-3 relative), the values the paper
    prints rounded (0.0345 is its "0.03": within 16%), under its bound sqrt(3)pi/2 4^-b."""
    mse = expected_mse(bits)
    assert mse == pytest.approx(MAX_1960_MSE[bits], rel=1e-3)
    assert mse == pytest.approx(PAPER_MSE[bits], rel=0.16)
    assert mse <= math.sqrt(3) * math.pi / 2 * 4.0**-bits
    levels, thresholds = lloyd_max(bits)
    assert len(levels) == 2**bits and np.all(np.diff(levels) > 0)
    np.testing.assert_allclose(levels, -levels[::-1], atol=1e-9)  # symmetric
    np.testing.assert_allclose(thresholds, (levels[1:] + levels[:-1]) / 2)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantizer_mse_on_gaussian_vectors(bits):
    """Rotated Gaussian vectors in d = 128: the measured relative MSE ||x - x^||^2 / ||x||^2
    matches the codebook's (the paper's Theorem 1 value) within 3%."""
    d = 128
    x = mx.random.normal((4096, d), key=mx.random.key(bits))
    q = TurboQuantizer(bits)
    m = rotation(d)
    back = q.decode(*q.encode(x @ m), mx.float32) @ m.T
    rel = mx.mean(mx.sum((back - x) ** 2, -1) / mx.sum(x * x, -1)).item()
    assert rel == pytest.approx(expected_mse(bits), rel=0.03)


@pytest.mark.parametrize("d", [64, 128, 96])
def test_rotation_is_orthogonal_and_keeps_dot_products(d):
    m = rotation_matrix(d)
    np.testing.assert_allclose(m @ m.T, np.eye(d), atol=1e-12)
    if d & (d - 1) == 0:  # random signs times a scaled Hadamard matrix: entries +-1/sqrt(d)
        np.testing.assert_allclose(np.abs(m), 1 / math.sqrt(d), atol=1e-12)
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((5, d)), rng.standard_normal((7, d))
    np.testing.assert_allclose((q @ m) @ (k @ m).T, q @ k.T, atol=1e-10)
    assert np.array_equal(rotation_matrix(d), m)  # fixed: every process rotates alike


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_roundtrip(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, (2, 3, 5, 64))
    words = pack(mx.array(codes), bits)
    assert words.dtype == mx.uint32 and words.shape[-1] == 64 * bits // 32
    np.testing.assert_array_equal(np.array(unpack(words, bits)), codes)


def test_window_slots():
    w = Window(size=10, keep=2)
    np.testing.assert_array_equal(w.slot(np.arange(10)), np.arange(10))
    # After the window fills, tokens cycle through slots 2..9, overwriting the oldest.
    np.testing.assert_array_equal(w.slot(np.array([10, 11, 17, 18])), [2, 3, 9, 2])
    assert w.order(7) is None
    order = w.order(13)  # keeps tokens 0, 1 and the latest 8: 5..12
    assert order is not None
    assert sorted(order.tolist()) == [0, 1, *range(5, 13)]
    np.testing.assert_array_equal(w.slot(order), np.arange(10))  # each at its own slot


@pytest.mark.parametrize("cfg", SCHEMES, ids=KVQuantConfig.describe)
def test_codec_attention_close_to_full_precision(cfg):
    """Grouped-query attention (4 query heads on 2 KV heads) with a causal chunk and with a
    boolean mask: each codec's output is within its quantization error of exact attention."""
    keys_ = mx.random.key(1)
    k, v = mx.random.normal((2, 2, 33, 64), key=keys_), mx.random.normal((2, 2, 33, 64))
    q = mx.random.normal((2, 4, 3, 64))
    codec = make_codec(cfg)
    ks, vs = codec.encode_keys(k), codec.encode_values(v)
    mask = mx.arange(33)[None, None, None, :] < mx.array([20, 33])[:, None, None, None]
    for m in ("causal", mask):
        ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=m)
        out = codec.attention(q, ks, vs, 0.125, m)
        err = mx.sqrt(mx.mean((out - ref) ** 2) / mx.mean(ref**2)).item()
        assert err < 4 * 2.0 ** -min(cfg.key_bits, cfg.value_bits), err


def _formula(cfg: KVQuantConfig, n_kv: int, d: int) -> int:
    """The per-layer bytes of one token, written out again for the test (fp32: 4 bytes)."""
    if cfg.scheme == "uniform":
        return n_kv * 2 * (d * int(cfg.bits) // 8 + 2 * (d // cfg.group_size) * 4)
    return n_kv * (d * (cfg.key_bits + cfg.value_bits) // 8 + 2 * 4)


@pytest.mark.parametrize("cfg", SCHEMES, ids=KVQuantConfig.describe)
def test_bytes_per_token_measured_equals_formula(cfg):
    n_kv, d = 2, 128
    assert cfg.bytes_per_token(1, n_kv, d, 4) == _formula(cfg, n_kv, d)
    k = mx.random.normal((1, n_kv, 300, d))
    single = QuantKVCache(make_codec(cfg))
    single.load(k, k)
    tokens = single.keys[0].shape[2]  # the buffers' token capacity (whole steps)
    assert single.nbytes / tokens == _formula(cfg, n_kv, d)
    layout = BatchLayout()
    batch = BatchQuantCache(layout, make_codec(cfg), None)
    layout.reserve(3, 300, 8)
    batch.insert(3, k, k)
    assert batch.nbytes / (layout.slots * layout.capacity) == _formula(cfg, n_kv, d)
    full = KVQuantConfig().bytes_per_token(1, n_kv, d, 4)
    assert full == n_kv * 2 * d * 4 and full / _formula(cfg, n_kv, d) > 3.5


def test_window_layout_full_rows_see_the_whole_window():
    layout = WindowLayout(Window(size=6, keep=2))
    layout.begin(np.array([3, 6, 9]), 8)
    np.testing.assert_array_equal(np.array(layout.write), [3, 2, 5])  # 2 + (t - 2) % 4
    assert layout.span == 6
    np.testing.assert_array_equal(np.array(layout.mask)[:, 0, 0].sum(-1), [4, 6, 6])
    with pytest.raises(ValueError, match="one token per row"):
        layout.begin(np.array([3]), 8, width=3)
    layout.reserve(0, 1000, 8)
    assert layout.capacity < 1000  # a slot never holds more than the window


@pytest.mark.parametrize(
    "cfg, match",
    [
        (KVQuantConfig(5, "turboquant"), "turboquant kv bits"),
        (KVQuantConfig(7), "uniform kv bits"),
        (KVQuantConfig(4, "nf4"), "scheme"),
        (KVQuantConfig(4, group_size=48), "group size"),
        (KVQuantConfig(max_kv_size=3), "must exceed keep"),
    ],
)
def test_bad_settings_are_refused(cfg, match):
    with pytest.raises(ValueError, match=match):
        cfg.check()


def test_head_dim_must_fit_the_packing():
    with pytest.raises(ValueError, match="head_dim % 64"):
        KVQuantConfig(8).check(head_dim=80)
    with pytest.raises(ValueError, match="head_dim % 32"):
        KVQuantConfig(3, "turboquant").check(head_dim=80)
    KVQuantConfig(8, group_size=32).check(head_dim=96)


def test_window_attends_exactly_the_kept_and_latest_tokens():
    """A full-precision window of 10 (keep 2) loaded with a 13-token prompt, then 8 decode
    steps: each step's attention equals exact attention over tokens {0, 1} + the latest 8."""
    size, keep, total = 10, 2, 21
    k, v = mx.random.normal((1, 2, total, 64)), mx.random.normal((1, 2, total, 64))
    q = mx.random.normal((1, 4, total, 64))
    cache = QuantKVCache(make_codec(KVQuantConfig(max_kv_size=size)), Window(size, keep))
    cache.load(k[:, :, :13], v[:, :, :13])
    for t in range(13, total):
        out = cache.attend(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], 0.125, None)
        seen = mx.array([0, 1, *range(t - (size - keep) + 1, t + 1)])
        ref = mx.fast.scaled_dot_product_attention(
            q[:, :, t : t + 1], k[:, :, seen], v[:, :, seen], scale=0.125
        )
        np.testing.assert_allclose(np.array(out), np.array(ref), atol=1e-5)
    assert cache.offset == total and cache.state[0].shape[2] == size


@pytest.mark.parametrize("bits", [8, 4])
def test_uniform_expanded_attention_matches_packed(bits):
    """The CUDA path (keys and values expanded for the attention call) gives the packed
    path's output: same codes, same mask (grouped queries, a causal chunk, a boolean mask)."""
    from shared.models.kv_quant.uniform import UniformCodec

    k, v = mx.random.normal((2, 2, 70, 64)), mx.random.normal((2, 2, 70, 64))
    q = mx.random.normal((2, 4, 3, 64))
    packed, expanded = UniformCodec(bits, 64, packed=True), UniformCodec(bits, 64, packed=False)
    ks, vs = packed.encode_keys(k), packed.encode_values(v)
    mask = mx.arange(70)[None, None, None, :] < mx.array([50, 70])[:, None, None, None]
    for m in ("causal", mask, None):
        a = packed.attention(q, ks, vs, 0.125, m)
        b = expanded.attention(q, ks, vs, 0.125, m)
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)
