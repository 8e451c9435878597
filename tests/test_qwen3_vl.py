"""Qwen3-VL in MLX against transformers' `Qwen3VLForConditionalGeneration` (fp32, CPU).

A tiny random checkpoint (`shared.testing.qwen3_vl_fixture`: 3-block ViT with DeepStack taps after
blocks 0 and 1, 3-layer Qwen3 LM with interleaved M-RoPE). Checked: the vision features and every
DeepStack level, the logits of every prompt position within 1e-4 relative and 32 greedy tokens
identical, for text, one image, two images, a video file, a video given as frames, image + video,
and one image per turn; the prompt ids (video timestamps included) against transformers'
`Qwen3VLProcessor`; chunked prefill; the other checkpoint layouts, 4-bit included; and the
encoder -> cache entry -> decoder path carrying the DeepStack tensors.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from prism.v1 import common_pb2, decoder_pb2  # noqa: E402

from services.decoder.prompt import build_prompt  # noqa: E402
from services.encoder.engine import EncoderEngine, MediaItemInput, ref_from_header  # noqa: E402
from shared.api import build_messages, load  # noqa: E402
from shared.models.base import MediaFeatures  # noqa: E402
from shared.runtime.generate import encode_media, prepare_inputs, stream_generate  # noqa: E402
from shared.runtime.sampling import SamplingParams  # noqa: E402
from shared.testing.qwen3_vl_fixture import make_qwen3_vl_checkpoint  # noqa: E402
from tests.media_samples import sample_image, sample_video  # noqa: E402
from tests.reference import reference_inputs, rel_err  # noqa: E402
from tests.test_encoder_service import MemoryCache  # noqa: E402
from tests.test_model_e2e import _dequantized_copy  # noqa: E402

TOL = 1e-4
N_TOKENS = 32
FRAMES_FPS = 3.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_vl")
    made: dict[str, Path] = {}

    def get(layout: str = "hf") -> Path:
        if layout not in made:
            made[layout] = make_qwen3_vl_checkpoint(root / layout, layout)
        return made[layout]

    return get


@pytest.fixture(scope="module")
def model(checkpoint):
    return load(checkpoint("hf"))


@pytest.fixture(scope="module")
def reference(checkpoint):
    import transformers

    path = str(checkpoint("hf"))
    ref = transformers.Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return ref.eval()


def frames(n: int = 6, size: tuple[int, int] = (96, 64), seed: int = 5) -> np.ndarray:
    """(n, H, W, 3) uint8: a bright square moving over noise."""
    width, height = size
    out = np.random.default_rng(seed).integers(0, 120, (n, height, width, 3), dtype=np.uint8)
    for i in range(n):
        out[i, 8 : 8 + 24, 6 * i : 6 * i + 24] = 250
    return out


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    d = tmp_path_factory.mktemp("media")
    img_a, img_b = sample_image(d / "a.png", 224, 168, 0), sample_image(d / "b.png", 112, 140, 1)
    video = sample_video(d / "v.mp4", n_frames=8, size=(84, 56))
    clip = {"type": "video", "video": [Image.fromarray(f) for f in frames()], "fps": FRAMES_FPS}
    turn_two = [{"type": "image", "image": img_b}, {"type": "text", "text": "And this one?"}]
    return {
        "text": build_messages("Tell me a short story about the sea."),
        "one_image": build_messages("What is in this picture?", images=[img_a]),
        "two_images": build_messages("Compare the two pictures.", images=[img_a, img_b]),
        "video": build_messages("What happens in the video?", videos=[video]),
        "frames": [{"role": "user", "content": [clip, {"type": "text", "text": "Describe."}]}],
        "image_and_video": [
            {"role": "user", "content": [{"type": "image", "image": img_a}, clip, "Both?"]}
        ],
        "image_per_turn": build_messages("What is this?", images=[img_a])
        + [{"role": "assistant", "content": "A gradient."}, {"role": "user", "content": turn_two}],
    }


# ---------------------------------------------------------------------------------- helpers


def ref_kwargs(ref, prompt, ids: list[int]) -> dict[str, Any]:
    kwargs = reference_inputs(prompt, ids, ref.config.image_token_id, ref.config.video_token_id)
    kwargs.pop("second_per_grid_ts", None)  # Qwen2.5-VL only
    return kwargs


def ref_logits(ref, prompt) -> np.ndarray:
    with torch.no_grad():
        return ref(**ref_kwargs(ref, prompt, prompt.input_ids)).logits[0].numpy()


def ref_greedy(ref, prompt, n: int = N_TOKENS) -> list[int]:
    """Full recomputation each step: no cache, no generate() machinery."""
    ids, out = list(prompt.input_ids), []
    for _ in range(n):
        with torch.no_grad():
            token = int(torch.argmax(ref(**ref_kwargs(ref, prompt, ids)).logits[0, -1]))
        out.append(token)
        ids.append(token)
    return out


def our_logits(model, prompt, features: list[MediaFeatures] | None = None) -> np.ndarray:
    if features is None:
        features = encode_media(model, prompt.media)
    inputs = prepare_inputs(model, prompt, features)
    logits = model.language(
        inputs.input_ids,
        model.language.make_cache(),
        input_embeddings=inputs.input_embeddings,
        position_ids=inputs.position_ids,
        **inputs.extras,
    )
    return np.array(logits[0].astype(mx.float32))


def our_greedy(model, prompt, n: int = N_TOKENS) -> list[int]:
    model = dataclasses.replace(model, eos_token_ids=frozenset())  # all n tokens
    return [
        c.token for c in stream_generate(model, prompt, max_tokens=n, sampling=SamplingParams())
    ]


def _is_video(pair: tuple) -> bool:
    return pair[0].modality == "video"


# ---------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", ["one_image", "two_images", "video", "image_and_video"])
def test_vision_features_and_every_deepstack_level_match(model, reference, prompts, case):
    prompt = model.processor(prompts[case])
    ours = encode_media(model, prompt.media)
    kwargs = ref_kwargs(reference, prompt, prompt.input_ids)
    expected: dict[str, list[np.ndarray]] = {}
    inputs = [("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")]
    with torch.no_grad():  # transformers encodes images, then videos
        for pixels, grid in inputs:
            if pixels in kwargs:
                out = reference.model.visual(kwargs[pixels], grid_thw=kwargs[grid])
                expected.setdefault("features", []).append(out.pooler_output.numpy())
                for i, level in enumerate(out.deepstack_features):
                    expected.setdefault(f"deepstack.{i}", []).append(level.numpy())
    # Images first, then videos, each in prompt order (a stable sort), as transformers has them.
    by_kind = [f for _, f in sorted(zip(prompt.media, ours, strict=True), key=_is_video)]
    for name, parts in expected.items():
        got = np.concatenate([np.array(f.tensors()[name]) for f in by_kind])
        err = rel_err(got, np.concatenate(parts))
        assert err < TOL, f"{name}: relative error {err:.2e}"
    assert sorted(ours[0].extras) == ["deepstack.0", "deepstack.1"]


@pytest.mark.parametrize(
    "case",
    ["text", "one_image", "two_images", "video", "frames", "image_and_video", "image_per_turn"],
)
def test_logits_and_greedy_match_transformers(model, reference, prompts, case):
    prompt = model.processor(prompts[case])
    assert bool(prompt.media) == (case != "text")
    err = rel_err(our_logits(model, prompt), ref_logits(reference, prompt))
    assert err <= TOL, f"logits relative error {err:.2e}"
    assert our_greedy(model, prompt) == ref_greedy(reference, prompt)


def test_deepstack_injection_is_exercised(model, reference, prompts):
    """Without the DeepStack levels the logits leave the tolerance (so the parity above sees
    them); features missing them are refused, not silently used."""
    prompt = model.processor(prompts["one_image"])
    inputs = prepare_inputs(model, prompt, encode_media(model, prompt.media))
    logits = model.language(
        inputs.input_ids,
        model.language.make_cache(),
        input_embeddings=inputs.input_embeddings,
        position_ids=inputs.position_ids,
    )
    assert rel_err(np.array(logits[0]), ref_logits(reference, prompt)) > TOL
    bare = [MediaFeatures(f.features) for f in encode_media(model, prompt.media)]
    with pytest.raises(ValueError, match="DeepStack levels"):
        prepare_inputs(model, prompt, bare)


@pytest.mark.parametrize("section", [(24, 20, 20), (2, 3, 3), (16, 24, 24)])
def test_interleaved_mrope_bands_match_transformers(section):
    """Which position row drives each rotary band, at the published and the tiny sections."""
    from types import SimpleNamespace

    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    from shared.models.qwen3_vl.language import interleaved_rows

    half = sum(section)
    freqs = torch.arange(3, dtype=torch.float32)[:, None, None, None].expand(3, 1, 1, half).clone()
    hf = SimpleNamespace(mrope_section=list(section))
    rows = Qwen3VLTextRotaryEmbedding.recomposition_frequencies(hf, freqs)[0, 0, :half]
    assert interleaved_rows(half, section).tolist() == rows.long().tolist()


def test_prefill_in_chunks_equals_one_pass(model, prompts, monkeypatch):
    """DeepStack rows are cut per chunk with the embeddings (`PrefillInputs.extras`)."""
    import shared.runtime.generate as gen

    prompt = model.processor(prompts["image_and_video"])
    inputs = prepare_inputs(model, prompt, encode_media(model, prompt.media))
    assert inputs.extras["deepstack_embeds"].shape[:2] == (2, len(prompt.input_ids))
    whole = gen.prefill(model.language, inputs, model.language.make_cache())
    monkeypatch.setattr(gen, "PREFILL_STEP", 7)
    chunked = gen.prefill(model.language, inputs, model.language.make_cache())
    np.testing.assert_allclose(np.array(chunked), np.array(whole), atol=1e-5)


# ---------------------------------------------------------------------------------- processor


def test_prompt_ids_match_transformers_processor(model, prompts):
    """Image placeholders, and per-frame `<t seconds>` blocks for a video given as frames, as
    transformers' `Qwen3VLProcessor.replace_*_token` write them (its video processor needs
    torchvision, so its text expansion is driven here with our grids)."""
    from types import SimpleNamespace

    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    processor = model.processor
    ours = processor(prompts["image_and_video"])
    image, video = ours.media
    n = len(frames())
    hf = SimpleNamespace(
        image_processor=SimpleNamespace(merge_size=2), image_token="<|image_pad|>",
        video_processor=SimpleNamespace(merge_size=2, temporal_patch_size=2),
        video_token="<|video_pad|>", vision_start_token="<|vision_start|>",
        vision_end_token="<|vision_end|>",
        _calculate_timestamps=lambda *a: Qwen3VLProcessor._calculate_timestamps(None, *a),
    )  # fmt: skip
    meta = VideoMetadata(total_num_frames=n, fps=FRAMES_FPS, frames_indices=list(range(n)))
    image_text = Qwen3VLProcessor.replace_image_token(
        hf, {"image_grid_thw": np.array([image.grid_thw])}, 0
    )
    video_text = Qwen3VLProcessor.replace_video_token(
        hf, {"video_grid_thw": np.array([video.grid_thw]), "video_metadata": [meta]}, 0
    )
    text = processor.render(prompts["image_and_video"])
    text = text.replace("<|image_pad|>", image_text).replace("<|video_pad|>", video_text)
    assert ours.input_ids == processor.tokenizer.encode(text, add_special_tokens=False)
    assert video.grid_thw[0] == 3 and "<0.2 seconds>" in video_text  # (0 + 1/3) / 2 s


def test_placeholders_that_do_not_match_the_media_are_refused(model, prompts):
    processor = model.processor
    image, video = processor(prompts["image_and_video"]).media
    pad = "<|vision_start|><|video_pad|><|vision_end|>"
    with pytest.raises(ValueError, match="placeholders"):
        processor.build_prompt(pad + pad, [video])
    with pytest.raises(ValueError, match="does not match"):
        processor.build_prompt(pad, [image])


# ---------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout", ["hf-legacy", "mlx"])
def test_layouts_load_to_the_same_model(checkpoint, model, prompts, layout):
    other = load(checkpoint(layout))
    prompt = model.processor(prompts["one_image"])
    assert other.processor(prompts["one_image"]).input_ids == prompt.input_ids
    np.testing.assert_allclose(our_logits(other, prompt), our_logits(model, prompt), atol=1e-5)


def test_4bit_matches_its_dequantized_weights(checkpoint, model, prompts):
    import mlx.nn as nn

    q = load(checkpoint("mlx-4bit"))
    assert isinstance(q.language.layers[0].mlp.gate_proj, nn.QuantizedLinear)
    assert not isinstance(q.vision.deepstack_merger_list[0].linear_fc1, nn.QuantizedLinear)
    d = load(checkpoint("mlx-4bit"))
    _dequantized_copy(d.language)
    prompt = q.processor(prompts["video"])
    feats_q, feats = encode_media(q, prompt.media), encode_media(model, prompt.media)
    for name, value in feats[0].tensors().items():  # the tower is not quantized
        assert rel_err(np.array(feats_q[0].tensors()[name]), np.array(value)) < TOL
    err = rel_err(our_logits(q, prompt), our_logits(d, prompt))
    assert err <= TOL, f"quantized vs dequantized logits relative error {err:.2e}"
    assert our_greedy(q, prompt, 16) == our_greedy(d, prompt, 16)


# ---------------------------------------------------------------------------------- services


def test_encoder_entry_to_decoder_prompt_keeps_deepstack_and_timestamps(checkpoint, model, prompts):
    """The encoder (vision weights only) stores "features" plus "deepstack.{i}" under one key;
    the decoder (language weights only) rebuilds the same prompt, video timestamps from the
    ref's seconds_per_grid, and the same logits as the whole model in process."""
    encoder = load(checkpoint("hf"), components=["vision"])
    decoder = load(checkpoint("hf"), components=["language"])
    assert encoder.language is None and decoder.vision is None
    cache = MemoryCache()
    engine = EncoderEngine({"q3": encoder}, cache)
    data = Path(prompts["video"][0]["content"][0]["video"]).read_bytes()
    [item] = asyncio.run(engine.encode("q3", [MediaItemInput("video", data)]))
    ref = item.ref
    assert [t.name for t in ref.tensors] == ["features", "deepstack.0", "deepstack.1"]
    assert all(t.shape == ref.tensors[0].shape for t in ref.tensors)
    header = asyncio.run(cache.head(ref.key))
    assert ref_from_header(ref.key, "video", header) == ref  # a cache hit rebuilds the same ref

    proto_ref = common_pb2.MediaFeatureRef(
        content_key=ref.key, modality=common_pb2.MODALITY_VIDEO, num_tokens=ref.num_tokens,
        grid=list(ref.grid), seconds_per_grid=ref.seconds_per_grid,
    )  # fmt: skip
    parts = [decoder_pb2.ContentPart(media=proto_ref), decoder_pb2.ContentPart(text="What?")]
    request = decoder_pb2.GenerateRequest(
        model="q3",
        messages=decoder_pb2.Messages(
            messages=[decoder_pb2.ChatMessage(role="user", content=parts)],
            add_generation_prompt=True,
        ),
    )
    fetched = {ref.key: MediaFeatures.from_tensors(cache.entries[ref.key])}
    prompt, features = build_prompt(decoder, request, fetched)
    local = model.processor(
        build_messages("What?", videos=[prompts["video"][0]["content"][0]["video"]])
    )
    assert prompt.input_ids == local.input_ids
    np.testing.assert_allclose(
        our_logits(decoder, prompt, features), our_logits(model, local), atol=1e-5
    )
