"""SmolVLM / Idefics3 in MLX against transformers in fp32.

Tiny random checkpoints (`shared/testing/smolvlm_fixture.py`): 32-pixel tiles of 8 x 8 patches
pixel-shuffled to 16 tokens, pictures resized to a longest edge of 3 tiles, so an image
becomes up to 3 x 3 tiles plus its global image. The reference runs the prompt through
transformers once, then decodes on its KV cache (as `generate` does). Prompt ids are
compared with transformers' `Idefics3Processor` (SmolVLM's needs torchvision for its video
half; its image text is the same `get_image_prompt_string`, checked on its own).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from shared.api import build_messages, load  # noqa: E402
from shared.media.image import load_image  # noqa: E402
from shared.media.types import ProcessedPrompt  # noqa: E402
from shared.models.smolvlm.processor import SmolVLMProcessor, tile_layout  # noqa: E402
from shared.runtime.generate import encode_media, stream_generate  # noqa: E402
from shared.testing.smolvlm_fixture import (  # noqa: E402
    IMAGE_SEQ_LEN,
    TOKEN_IDS,
    make_smolvlm_checkpoint,
)
from tests.media_samples import sample_image  # noqa: E402
from tests.reference import one_torch_thread, rel_err  # noqa: E402, F401  (autouse fixture)
from tests.vlm_parity_support import (  # noqa: E402
    N_TOKENS,
    assert_matches_dequantized,
    our_greedy,
    our_logits,
    split_loaded_names,
)

TOL = 1e-4
IMAGE_ID = TOKEN_IDS["<image>"]
REF_CLASSES = {
    "smolvlm": "SmolVLMForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Any:
    root = tmp_path_factory.mktemp("smolvlm")
    made: dict[tuple[str, str], Path] = {}

    def get(layout: str = "hf", model_type: str = "smolvlm") -> Path:
        if (layout, model_type) not in made:
            out = root / f"{model_type}-{layout}"
            made[layout, model_type] = make_smolvlm_checkpoint(out, layout, model_type=model_type)
        return made[layout, model_type]

    return get


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("media")
    return {
        "square": sample_image(d / "a.png", 56, 40, 0),  # 3 x 3 tiles
        "tall": sample_image(d / "b.png", 30, 64, 1),  # 3 rows x 2 cols
        "wide": sample_image(d / "c.png", 100, 30, 2),  # 1 row x 3 cols
    }


@pytest.fixture(scope="module")
def prompts(images) -> dict[str, list[dict]]:
    return {
        "text": build_messages("Tell me a short story about the sea, and a cat."),
        "one_image": build_messages("What is in this picture?", images=[images["square"]]),
        "two_images": build_messages(
            "Compare the two pictures.", images=[images["tall"], images["wide"]]
        ),
    }


@pytest.fixture(scope="module")
def models(ckpt) -> dict[str, tuple[Any, Any]]:
    cache: dict[str, tuple[Any, Any]] = {}

    def get(model_type: str = "smolvlm") -> tuple[Any, Any]:
        if model_type not in cache:
            path = ckpt("hf", model_type)
            ref_cls = getattr(transformers, REF_CLASSES[model_type])
            ref = ref_cls.from_pretrained(str(path), dtype=torch.float32).eval()
            cache[model_type] = (load(path), ref)
        return cache[model_type]

    return get


def unsplit(processor: SmolVLMProcessor) -> SmolVLMProcessor:
    """The same processor with image splitting off (preprocessor `do_image_splitting`)."""
    out = copy.copy(processor)
    out.image_processor = copy.deepcopy(processor.image_processor)
    out.image_processor.do_image_splitting = False
    return out


def reference_processor(processor: SmolVLMProcessor) -> Any:
    return transformers.Idefics3Processor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        image_seq_len=IMAGE_SEQ_LEN,
    )


def ref_kwargs(prompt: ProcessedPrompt, ids: list[int]) -> dict[str, Any]:
    """The processor's outputs for the prompt extended by `ids`: every tile of every image
    in one sample, as Idefics3Processor batches them."""
    out: dict[str, Any] = {"input_ids": torch.tensor([ids])}
    if prompt.media:
        pixels = np.concatenate([m.pixel_values for m in prompt.media])
        out["pixel_values"] = torch.from_numpy(pixels)[None]
    return out


def ref_logits(ref: Any, prompt: ProcessedPrompt) -> np.ndarray:
    with torch.no_grad():
        return ref(**ref_kwargs(prompt, prompt.input_ids)).logits[0].numpy()


def ref_greedy(ref: Any, prompt: ProcessedPrompt, n: int = N_TOKENS) -> list[int]:
    """Greedy as transformers' `generate` runs it (prompt with pixels once, then one token at
    a time on its KV cache: a generated `<image>` id is then a plain token, as in ours);
    asserts no step is a near-tie (a meaningless compare)."""
    kwargs, out, past = ref_kwargs(prompt, prompt.input_ids), [], None
    for _ in range(n):
        with torch.no_grad():
            result = ref(**kwargs, cache=past, use_cache=True)
        logits, past = result.logits[0, -1], result.past_key_values
        top2 = torch.topk(logits, 2).values
        assert float(top2[0] - top2[1]) > 1e-3, "near-tie: pick another fixture seed"
        out.append(int(torch.argmax(logits)))
        kwargs = {"input_ids": torch.tensor([[out[-1]]])}
    return out


def our_prompt(model: Any, messages: list[dict], split: bool) -> ProcessedPrompt:
    processor = model.processor if split else unsplit(model.processor)
    return processor(messages)


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("image", ["square", "tall", "wide"])
def test_prompt_ids_and_pixels_match_transformers(models, images, image, split) -> None:
    ours, _ = models()
    processor = ours.processor if split else unsplit(ours.processor)
    messages = build_messages("What is in this picture?", images=[images[image]])
    prompt = processor(messages)
    out = reference_processor(processor)(
        text=processor.render(messages),
        images=[load_image(images[image])],
        return_tensors="np",
        add_special_tokens=False,
    )
    assert out["input_ids"][0].tolist() == prompt.input_ids
    np.testing.assert_array_equal(out["pixel_values"][0], prompt.media[0].pixel_values)
    expected = {"square": (3, 3), "tall": (3, 2), "wide": (1, 3)}[image] if split else (0, 0)
    assert tile_layout(prompt.media[0]) == expected
    rows, cols = expected
    assert prompt.input_ids.count(IMAGE_ID) == (rows * cols + 1) * IMAGE_SEQ_LEN


def test_two_images_prompt_matches_transformers(models, images, prompts) -> None:
    ours, _ = models()
    prompt = ours.processor(prompts["two_images"])
    out = reference_processor(ours.processor)(
        text=ours.processor.render(prompts["two_images"]),
        images=[load_image(images["tall"]), load_image(images["wide"])],
        return_tensors="np",
        add_special_tokens=False,
    )
    assert out["input_ids"][0].tolist() == prompt.input_ids
    pixels = np.concatenate([m.pixel_values for m in prompt.media])
    np.testing.assert_array_equal(out["pixel_values"][0], pixels)


def test_image_text_is_smolvlm_processors() -> None:
    """SmolVLMProcessor's own expansion (a module function there) gives the same text."""
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    processor = object.__new__(SmolVLMProcessor)
    processor.image_seq_len = 3
    for rows, cols in [(0, 0), (1, 3), (3, 2), (2, 2)]:
        expected = get_image_prompt_string(
            rows, cols, 3, "<fake_token_around_image>", "<image>", "<global-img>"
        )
        assert processor.image_text(rows, cols) == expected


def test_vision_features_match_transformers(models, prompts) -> None:
    ours, ref = models()
    prompt = ours.processor(prompts["two_images"])
    tiles = sum(m.pixel_values.shape[0] for m in prompt.media)
    got = mx.concatenate([f.features for f in encode_media(ours, prompt.media)])
    pixels = torch.from_numpy(np.concatenate([m.pixel_values for m in prompt.media]))[None]
    with torch.no_grad():
        expected = ref.model.get_image_features(pixels).pooler_output[0].numpy()
    assert got.shape == (tiles * IMAGE_SEQ_LEN, 64) == expected.shape
    assert rel_err(np.array(got), expected) <= TOL


@pytest.mark.parametrize(
    ("case", "split"),
    [("text", True), ("one_image", True), ("one_image", False), ("two_images", True)],
)
def test_logits_and_greedy_match_transformers(models, prompts, case, split) -> None:
    ours, ref = models()
    prompt = our_prompt(ours, prompts[case], split)
    err = rel_err(our_logits(ours, prompt), ref_logits(ref, prompt))
    assert err <= TOL, f"logits relative error {err:.2e}"
    expected = ref_greedy(ref, prompt)
    assert len(set(expected)) > 1, "degenerate continuation"
    assert our_greedy(ours, prompt) == expected


def test_idefics3_matches_transformers(models, prompts) -> None:
    ours, ref = models("idefics3")
    assert ours.family.name == "idefics3"
    prompt = ours.processor(prompts["one_image"])
    err = rel_err(our_logits(ours, prompt), ref_logits(ref, prompt))
    assert err <= TOL, f"logits relative error {err:.2e}"
    assert our_greedy(ours, prompt) == ref_greedy(ref, prompt)


def test_mlx_layout_loads_to_the_same_model(ckpt, prompts) -> None:
    base, other = load(ckpt("hf")), load(ckpt("mlx"))
    prompt = base.processor(prompts["one_image"])
    assert other.processor(prompts["one_image"]).input_ids == prompt.input_ids
    np.testing.assert_allclose(our_logits(other, prompt), our_logits(base, prompt), atol=1e-5)


def test_4bit_matches_its_dequantized_weights(ckpt, prompts) -> None:
    """mlx-community 4-bit: the LM and the connector are quantized, SigLIP is not."""
    from mlx.utils import tree_flatten

    from tests.test_model_e2e import _dequantized_copy

    q, d = load(ckpt("mlx-4bit")), load(ckpt("mlx-4bit"))
    names = [k for k, _ in tree_flatten(q.vision.parameters())]
    assert "connector.modality_projection.proj.scales" in names
    assert not any(k.startswith("vision_model.") and k.endswith(".scales") for k in names)
    _dequantized_copy(d.language)
    _dequantized_copy(d.vision)
    assert_matches_dequantized(q, d, q.processor(prompts["one_image"]), TOL)


def test_split_loading_keeps_halves_apart(ckpt) -> None:
    names, lm_names = split_loaded_names(ckpt("hf"))
    assert any(k.startswith("connector.") for k in names)  # the encoder projects
    assert all(k.startswith(("vision_model.", "connector.")) for k in names)
    assert all(k.startswith(("model.", "lm_head.")) for k in lm_names)


def test_grid_mismatch_is_a_value_error(models, prompts) -> None:
    """A grid whose tile count does not fit its rows x cols is refused (a 400 upstream)."""
    ours, _ = models()
    prompt = ours.processor(prompts["one_image"])
    bad = dataclasses.replace(prompt.media[0], grid_thw=(10, 8, 8, 2, 3))
    with pytest.raises(ValueError, match="tiles"):
        ours.processor.build_prompt(ours.processor.render(prompts["one_image"]), [bad])
    with pytest.raises(ValueError, match="placeholders"):
        ours.processor.build_prompt("no image here", [prompt.media[0]])


def test_prism_generate_with_image(ckpt, images) -> None:
    from tests.test_cli import run_prism

    path = ckpt("hf")
    args = ["generate", "--model", str(path), "--prompt", "Describe it.", "--max-tokens", "12"]
    proc = run_prism(*args, "--image", images["wide"])
    assert proc.returncode == 0, proc.stderr
    model = load(path)
    messages = build_messages("Describe it.", images=[images["wide"]])
    expected = "".join(
        c.text for c in stream_generate(model, model.processor(messages), max_tokens=12)
    )
    assert proc.stdout == expected + "\n"


def test_string_contents_reach_list_only_templates(models) -> None:
    """Templates in the style of HuggingFaceTB/SmolVLM-*-Instruct read `content` as a list of
    parts only; a text-only turn (the decoder forwards those as strings) keeps its text."""
    ours, _ = models()
    processor = copy.copy(ours.processor)
    processor.chat_template = (
        "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
        "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
        "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
        "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
        "<end_of_utterance>\n{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    )
    text = processor.render([{"role": "user", "content": "Hello there"}])
    assert text == "<|im_start|>User: Hello there<end_of_utterance>\nAssistant:"


@pytest.mark.parametrize(("image_size", "patch"), [(512, 16), (364, 14), (384, 14), (32, 4)])
def test_full_tile_positions_are_the_identity_in_transformers(image_size, patch) -> None:
    """The tower adds the position table row by row; transformers buckets fractional patch
    coordinates, which for a whole tile of the published sizes gives the same rows."""
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionEmbeddings

    config = transformers.SmolVLMVisionConfig(
        hidden_size=1, image_size=image_size, patch_size=patch
    )
    emb = SmolVLMVisionEmbeddings(config)
    side = image_size // patch
    with torch.no_grad():
        emb.patch_embedding.weight.zero_()
        emb.patch_embedding.bias.zero_()
        emb.position_embedding.weight.copy_(torch.arange(side * side, dtype=torch.float32)[:, None])
        pixels = torch.zeros(1, 3, side * patch, side * patch)
        out = emb(pixels, torch.ones(1, side, side, dtype=torch.bool))
    assert out[0, :, 0].long().tolist() == list(range(side * side))


@pytest.mark.parametrize(
    ("grid", "ok"), [((7, 8, 8, 3, 2), True), ((1, 8, 8, 0, 0), True), ((7, 8, 8, 3), False)]
)
def test_decoder_takes_the_tile_grid_from_a_feature_ref(grid, ok) -> None:
    """The decoder keeps (tiles, side, side, rows, cols) from the ref; other lengths are a 400."""
    from prism.v1 import common_pb2

    from services.decoder.prompt import _media_input
    from shared.errors import InvalidRequestError
    from shared.models.base import MediaFeatures

    tokens = grid[0] * IMAGE_SEQ_LEN
    ref = common_pb2.MediaFeatureRef(
        content_key="k", modality=common_pb2.MODALITY_IMAGE, num_tokens=tokens, grid=list(grid)
    )
    features = {"k": MediaFeatures(mx.zeros((tokens, 4)))}
    if not ok:
        with pytest.raises(InvalidRequestError, match="grid"):
            _media_input(ref, features, 2)
        return
    item = _media_input(ref, features, 2)
    assert item.grid_thw == grid and tile_layout(item) == grid[3:]
