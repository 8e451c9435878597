"""Whole-model parity with transformers through the real loader, for every layout.

Greedy decoding runs through `stream_generate` (chunked prefill, KV cache, M-RoPE decode
deltas); the reference recomputes the full sequence with transformers at every step.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from shared.api import build_messages, load
from shared.runtime.generate import encode_media, prefill, prepare_inputs, stream_generate
from shared.runtime.sampling import SamplingParams
from tests.media_samples import sample_image, sample_video
from tests.reference import load_reference, reference_greedy, reference_logits, rel_err

VLM_FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
TEXT_FAMILIES = ["qwen2", "qwen3", "llama"]
N_TOKENS = 32
TOL = 1e-4


def our_logits(model, prompt) -> np.ndarray:
    inputs = prepare_inputs(model, prompt, encode_media(model, prompt.media))
    cache = model.language.make_cache()
    logits = model.language(
        inputs.input_ids,
        cache,
        input_embeddings=inputs.input_embeddings,
        position_ids=inputs.position_ids,
    )
    return np.array(logits[0].astype(mx.float32))


def our_greedy(model, prompt, n: int = N_TOKENS) -> list[int]:
    # No EOS: compare the full n tokens even if the random model "wants" to stop.
    model = dataclasses.replace(model, eos_token_ids=frozenset())
    chunks = stream_generate(model, prompt, max_tokens=n, sampling=SamplingParams())
    return [c.token for c in chunks]


def vlm_prompts(tmp_path_factory) -> dict[str, list[dict]]:
    d = tmp_path_factory.mktemp("media")
    img_a, img_b = sample_image(d / "a.png", 224, 168, 0), sample_image(d / "b.png", 112, 140, 1)
    video = sample_video(d / "v.mp4", n_frames=8, size=(84, 56))
    return {
        "text": build_messages("Tell me a short story about the sea."),
        "one_image": build_messages("What is in this picture?", images=[img_a]),
        "two_images": build_messages("Compare the two pictures.", images=[img_a, img_b]),
        "video": build_messages("What happens in the video?", videos=[video]),
    }


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return vlm_prompts(tmp_path_factory)


@pytest.mark.parametrize("family", VLM_FAMILIES)
@pytest.mark.parametrize("case", ["text", "one_image", "two_images", "video"])
def test_vlm_matches_transformers(checkpoint_factory, prompts, family, case):
    path = checkpoint_factory(family, "hf")
    ours, ref = load(path), load_reference(path, family)
    prompt = ours.processor(prompts[case])
    if case != "text":
        assert prompt.media, "media were not processed"
    err = rel_err(our_logits(ours, prompt), reference_logits(ref, prompt, family))
    assert err <= TOL, f"logits relative error {err:.2e}"
    assert our_greedy(ours, prompt) == reference_greedy(ref, prompt, family, N_TOKENS)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_text_model_matches_transformers(checkpoint_factory, family):
    path = checkpoint_factory(family, "hf")
    ours, ref = load(path), load_reference(path, family)
    prompt = ours.processor(build_messages("Tell me a short story about the sea."))
    err = rel_err(our_logits(ours, prompt), reference_logits(ref, prompt, family))
    assert err <= TOL, f"logits relative error {err:.2e}"
    assert our_greedy(ours, prompt) == reference_greedy(ref, prompt, family, N_TOKENS)


@pytest.mark.parametrize("family", VLM_FAMILIES + TEXT_FAMILIES)
@pytest.mark.parametrize("layout", ["hf-legacy", "mlx"])
def test_layouts_load_to_the_same_model(checkpoint_factory, prompts, family, layout):
    base = load(checkpoint_factory(family, "hf"))
    other = load(checkpoint_factory(family, layout))
    case = "one_image" if family in VLM_FAMILIES else "text"
    prompt = base.processor(prompts[case])
    assert other.processor(prompts[case]).input_ids == prompt.input_ids
    np.testing.assert_allclose(our_logits(other, prompt), our_logits(base, prompt), atol=1e-5)


def _dequantized_copy(model) -> None:
    """Replace every quantized layer by a float layer holding its dequantized weights."""
    import mlx.nn as nn

    def swap(_path, module):
        if isinstance(module, nn.QuantizedLinear):
            w = mx.dequantize(
                module.weight, module.scales, module.biases, module.group_size, module.bits
            )
            lin = nn.Linear(w.shape[1], w.shape[0], bias="bias" in module)
            lin.weight = w
            if "bias" in module:
                lin.bias = module.bias
            return lin
        if isinstance(module, nn.QuantizedEmbedding):
            w = mx.dequantize(
                module.weight, module.scales, module.biases, module.group_size, module.bits
            )
            emb = nn.Embedding(w.shape[0], w.shape[1])
            emb.weight = w
            return emb
        return module

    leaves = model.leaf_modules()
    replaced = {}
    for path, module in nn.utils.tree_flatten(leaves, is_leaf=nn.Module.is_module):
        new = swap(path, module)
        if new is not module:
            replaced[path] = new
    assert replaced, "no quantized layers found"
    model.update_modules(nn.utils.tree_unflatten(list(replaced.items())))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3"])
@pytest.mark.parametrize("layout", ["mlx-4bit", "mlx-8bit"])
def test_quantized_matches_its_dequantized_weights(checkpoint_factory, prompts, family, layout):
    q = load(checkpoint_factory(family, layout))
    d = load(checkpoint_factory(family, layout))
    _dequantized_copy(d.language)
    case = "one_image" if family in VLM_FAMILIES else "text"
    prompt = q.processor(prompts[case])
    err = rel_err(our_logits(q, prompt), our_logits(d, prompt))
    assert err <= 1e-4, f"quantized vs dequantized logits relative error {err:.2e}"
    assert our_greedy(q, prompt, 16) == our_greedy(d, prompt, 16)


def test_perturbed_weight_breaks_parity(checkpoint_factory, prompts):
    path = checkpoint_factory("qwen2_5_vl", "hf")
    ours, ref = load(path), load_reference(path, "qwen2_5_vl")
    block = ours.vision.blocks[0].attn.proj
    block.weight = block.weight + 1e-2
    prompt = ours.processor(prompts["one_image"])
    err = rel_err(our_logits(ours, prompt), reference_logits(ref, prompt, "qwen2_5_vl"))
    assert err > TOL


def test_prefill_in_chunks_equals_one_pass(checkpoint_factory, prompts, monkeypatch):
    import shared.runtime.generate as gen

    model = load(checkpoint_factory("qwen2_vl", "hf"))
    prompt = model.processor(prompts["two_images"])
    inputs = prepare_inputs(model, prompt, encode_media(model, prompt.media))
    whole = prefill(model.language, inputs, model.language.make_cache())
    monkeypatch.setattr(gen, "PREFILL_STEP", 7)
    chunked = prefill(model.language, inputs, model.language.make_cache())
    np.testing.assert_allclose(np.array(chunked), np.array(whole), atol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_keep_their_dtype(checkpoint_factory, prompts, dtype):
    from mlx.utils import tree_flatten

    # Asked for explicitly: with no --dtype the CPU computes in float32 when MKL is there
    # (tests/test_cpu_blas.py).
    half = load(checkpoint_factory("qwen2_5_vl", "hf", dtype=dtype), dtype=dtype)
    full = load(checkpoint_factory("qwen2_5_vl", "hf"))
    for module in (half.vision, half.language):
        dtypes = {str(v.dtype) for _, v in tree_flatten(module.parameters())}
        assert dtypes == {f"mlx.core.{dtype}"}, dtypes
    prompt = full.processor(prompts["one_image"])
    err = rel_err(our_logits(half, prompt), our_logits(full, prompt))
    assert err < 5e-2, f"{dtype} logits drift {err:.2e} from fp32"
    assert len(our_greedy(half, prompt, 8)) == 8
