"""Gemma 3 (image + text) and Gemma 3 text in MLX against transformers in fp32.

Tiny random checkpoints (`shared/testing/gemma3_fixture.py`): 3 text layers (sliding, global,
sliding) with a 12-token window, shorter than every prompt and than an image's 16 tokens, so
the window, the image tokens' bidirectional attention and their interplay all matter. The
reference recomputes the whole sequence with transformers at every greedy step, passing
`token_type_ids` as Gemma3Processor does (that is what turns the image attention on).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.models.gemma3.image_processing_pil_gemma3 import (  # noqa: E402
    Gemma3ImageProcessorPil,
)

from shared.api import build_messages, load  # noqa: E402
from shared.media.image import load_image  # noqa: E402
from shared.media.types import ProcessedPrompt  # noqa: E402
from shared.models.gemma3.masks import prefill_mask  # noqa: E402
from shared.models.gemma3.processor import Gemma3Processor  # noqa: E402
from shared.models.registry import PrefillInputs  # noqa: E402
from shared.runtime import generate as gen  # noqa: E402
from shared.runtime.generate import (  # noqa: E402
    encode_media,
    forward_span,
    prefill,
    prepare_inputs,
    stream_generate,
)
from shared.testing.gemma3_fixture import (  # noqa: E402
    MM_TOKENS,
    SLIDING_WINDOW,
    TOKEN_IDS,
    make_gemma3_checkpoint,
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
IMAGE_ID = TOKEN_IDS["<image_soft_token>"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Any:
    root = tmp_path_factory.mktemp("gemma3")
    made: dict[tuple[str, bool], Path] = {}

    def get(layout: str = "hf", text_only: bool = False) -> Path:
        key = (layout, text_only)
        if key not in made:
            out = root / f"{layout}-{'text' if text_only else 'vlm'}"
            made[key] = make_gemma3_checkpoint(out, layout, text_only=text_only)
        return made[key]

    return get


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> dict[str, list[dict]]:
    d = tmp_path_factory.mktemp("media")
    a, b = sample_image(d / "a.png", 56, 40, 0), sample_image(d / "b.png", 30, 64, 1)
    return {
        "text": build_messages("Tell me a short story about the sea, and a cat."),
        "one_image": build_messages("What is in this picture?", images=[a]),
        "two_images": build_messages("Compare the two pictures.", images=[a, b]),
    }


@pytest.fixture(scope="module")
def models(ckpt) -> tuple[Any, Any]:
    path = ckpt("hf")
    ref = transformers.Gemma3ForConditionalGeneration.from_pretrained(
        str(path), dtype=torch.float32
    )
    return load(path), ref.eval()


def ref_kwargs(prompt: ProcessedPrompt, ids: list[int]) -> dict[str, Any]:
    """Gemma3Processor's outputs for the prompt extended by generated `ids`."""
    input_ids = torch.tensor([ids])
    out: dict[str, Any] = {"input_ids": input_ids}
    if prompt.media:
        pixels = np.concatenate([m.pixel_values for m in prompt.media])
        out["pixel_values"] = torch.from_numpy(pixels)
        out["token_type_ids"] = (input_ids == IMAGE_ID).long()
    return out


def ref_logits(ref: Any, prompt: ProcessedPrompt) -> np.ndarray:
    with torch.no_grad():
        return ref(**ref_kwargs(prompt, prompt.input_ids)).logits[0].numpy()


def ref_greedy(ref: Any, prompt: ProcessedPrompt, n: int = N_TOKENS) -> list[int]:
    """Greedy by full recomputation; asserts no step is a near-tie (a meaningless compare)."""
    ids, out = list(prompt.input_ids), []
    for _ in range(n):
        with torch.no_grad():
            logits = ref(**ref_kwargs(prompt, ids)).logits[0, -1]
        top2 = torch.topk(logits, 2).values
        assert float(top2[0] - top2[1]) > 1e-3, "near-tie: pick another fixture seed"
        out.append(int(torch.argmax(logits)))
        ids.append(out[-1])
    return out


def test_vision_features_match_transformers(models, prompts) -> None:
    ours, ref = models
    prompt = ours.processor(prompts["two_images"])
    got = mx.concatenate([f.features for f in encode_media(ours, prompt.media)])
    pixels = torch.from_numpy(np.concatenate([m.pixel_values for m in prompt.media]))
    with torch.no_grad():
        expected = ref.model.get_image_features(pixels).pooler_output.numpy()
    assert got.shape == (2 * MM_TOKENS, 64)
    assert rel_err(np.array(got), expected.reshape(got.shape)) <= TOL


@pytest.mark.parametrize("case", ["text", "one_image", "two_images"])
def test_logits_and_greedy_match_transformers(models, prompts, case) -> None:
    ours, ref = models
    prompt = ours.processor(prompts[case])
    assert len(prompt.input_ids) > SLIDING_WINDOW  # the window matters
    assert prompt.input_ids.count(IMAGE_ID) == MM_TOKENS * len(prompt.media)
    err = rel_err(our_logits(ours, prompt), ref_logits(ref, prompt))
    assert err <= TOL, f"logits relative error {err:.2e}"
    expected = ref_greedy(ref, prompt)
    assert len(set(expected)) > 1, "degenerate continuation"
    assert our_greedy(ours, prompt) == expected


def test_image_attention_is_bidirectional(models, prompts) -> None:
    """Without token_type_ids transformers is causal over the image: a different model, so
    matching the reference above really tests the image mask."""
    ours, ref = models
    prompt = ours.processor(prompts["one_image"])
    kwargs = ref_kwargs(prompt, prompt.input_ids)
    kwargs.pop("token_type_ids")
    with torch.no_grad():
        causal = ref(**kwargs).logits[0].numpy()
    assert rel_err(our_logits(ours, prompt), causal) > 100 * TOL


def test_chunked_prefill_never_cuts_an_image(models, prompts, monkeypatch) -> None:
    """Chunks of 5 would end inside both images; `chunk_end` moves those ends past the image,
    and the result is the one-pass result. A chunk cut inside the image is not."""
    ours, _ = models
    prompt = ours.processor(prompts["two_images"])
    inputs = prepare_inputs(ours, prompt, encode_media(ours, prompt.media))
    (s0, e0), (s1, e1) = inputs.atomic_spans
    assert (e0 - s0, e1 - s1) == (MM_TOKENS, MM_TOKENS)
    assert inputs.chunk_end(s0 + 3) == e0 and inputs.chunk_end(s0) == s0
    whole = prefill(ours.language, inputs, ours.language.make_cache())
    monkeypatch.setattr(gen, "PREFILL_STEP", 5)
    chunked = prefill(ours.language, inputs, ours.language.make_cache())
    np.testing.assert_allclose(np.array(chunked), np.array(whole), atol=1e-5)
    cut = ours.language.make_cache()  # forcing a cut 3 tokens into the first image
    forward_span(ours.language, inputs, cut, 0, s0 + 3)
    last = len(prompt.input_ids) - 1
    forward_span(ours.language, inputs, cut, s0 + 3, last)
    wrong = forward_span(ours.language, inputs, cut, last, last + 1)[:, -1, :]
    assert rel_err(np.array(wrong), np.array(whole)) > 100 * TOL


def test_greedy_with_small_prefill_chunks(models, prompts, monkeypatch) -> None:
    ours, ref = models
    prompt = ours.processor(prompts["two_images"])
    monkeypatch.setattr(gen, "PREFILL_STEP", 7)
    assert our_greedy(ours, prompt, 12) == ref_greedy(ref, prompt, 12)


def test_prefill_mask_follows_transformers_rules() -> None:
    """Query 5 of a chunk starting at 4 (position 9) sees its image (8..11) ahead of it and,
    in a sliding layer, only keys > 9 - 3."""
    blocks = mx.array([[-1, -1, -1, -1, 0, 0, 0, 0]])  # positions 4..11; image at 8..11
    full = np.array(prefill_mask(4, 8, blocks, None))
    sliding = np.array(prefill_mask(4, 8, blocks, 3))
    assert full.shape == (8, 12)
    assert full[5].tolist() == [True] * 12  # position 9: causal + the rest of its image
    assert full[3].tolist() == [True] * 8 + [False] * 4  # position 7 is text: causal
    assert np.flatnonzero(sliding[5]).tolist() == [7, 8, 9, 10, 11]
    # What a sliding layer reads from key 2 on (4 - 3 + 1: the oldest its first query sees).
    np.testing.assert_array_equal(np.array(prefill_mask(4, 8, blocks, 3, 2)), sliding[:, 2:])
    assert not sliding[:, :2].any()


@pytest.mark.parametrize(
    ("layout", "text_only"), [("hf-legacy", False), ("mlx", False), ("mlx", True)]
)
def test_layouts_load_to_the_same_model(ckpt, prompts, layout, text_only) -> None:
    base, other = load(ckpt("hf", text_only)), load(ckpt(layout, text_only))
    case = "text" if text_only else "one_image"
    prompt = base.processor(prompts[case])
    assert other.processor(prompts[case]).input_ids == prompt.input_ids
    np.testing.assert_allclose(our_logits(other, prompt), our_logits(base, prompt), atol=1e-5)


def test_4bit_matches_its_dequantized_weights(ckpt, prompts) -> None:
    from tests.test_model_e2e import _dequantized_copy

    q, d = load(ckpt("mlx-4bit")), load(ckpt("mlx-4bit"))
    _dequantized_copy(d.language)
    assert_matches_dequantized(q, d, q.processor(prompts["one_image"]), TOL)


def test_split_loading_keeps_halves_apart(ckpt) -> None:
    names, _ = split_loaded_names(ckpt("hf"))
    assert any(k.startswith("multi_modal_projector.") for k in names)  # the encoder projects
    assert all(not k.startswith("model.") for k in names)


def test_text_only_gemma3_matches_transformers(ckpt, prompts) -> None:
    """gemma3_text (Gemma3ForCausalLM): the same language code, logits soft-capped at 30."""
    path = ckpt("hf", text_only=True)
    ours = load(path)
    assert ours.family.modalities == ("text",) and ours.language.args.final_logit_softcapping
    ref = transformers.Gemma3ForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    prompt = ours.processor(prompts["text"])
    err = rel_err(our_logits(ours, prompt), ref_logits(ref, prompt))
    assert err <= TOL, f"logits relative error {err:.2e}"
    assert our_greedy(ours, prompt) == ref_greedy(ref, prompt)


def test_chunk_end_moves_only_ends_inside_a_span() -> None:
    inputs = PrefillInputs(input_ids=mx.zeros((1, 10), mx.int32), atomic_spans=[(2, 6)])
    assert [inputs.chunk_end(e) for e in (2, 3, 5, 6, 7)] == [2, 6, 6, 6, 7]


def test_prism_generate_with_image(ckpt, tmp_path) -> None:
    from tests.test_cli import run_prism

    path, image = ckpt("hf"), sample_image(tmp_path / "c.png", 48, 48, 3)
    args = ["generate", "--model", str(path), "--prompt", "Describe it.", "--max-tokens", "12"]
    proc = run_prism(*args, "--image", image, "--system", "Be brief.")
    assert proc.returncode == 0, proc.stderr
    model = load(path)
    messages = build_messages("Describe it.", images=[image], system="Be brief.")
    expected = "".join(
        c.text for c in stream_generate(model, model.processor(messages), max_tokens=12)
    )
    assert proc.stdout == expected + "\n"


def test_pan_and_scan_matches_transformers(models, ckpt, tmp_path) -> None:
    """A wide image cut into crops: the same ids and pixels as transformers' Gemma3Processor
    (asked for pan-and-scan), and the same logits."""
    ours, ref = models
    pas = {
        "do_pan_and_scan": True,
        "pan_and_scan_min_crop_size": 8,
        "pan_and_scan_max_num_crops": 3,
        "pan_and_scan_min_ratio_to_activate": 1.2,
    }
    images = Gemma3ImageProcessorPil.from_pretrained(str(ckpt("hf")), **pas)
    processor = Gemma3Processor(
        ours.tokenizer, images, mm_tokens_per_image=MM_TOKENS, patches_per_side=8
    )
    wide = sample_image(tmp_path / "wide.png", 100, 30, 4)
    messages = build_messages("What is this?", images=[wide])
    prompt = processor(messages)
    assert prompt.media[0].grid_thw == (4, 8, 8)  # the image and 3 crops
    hf = transformers.Gemma3Processor(
        image_processor=images, tokenizer=ours.tokenizer, image_seq_length=MM_TOKENS
    )
    out = hf(text=processor.render(messages), images=[load_image(wide)], return_tensors="np", **pas)
    assert out["input_ids"][0].tolist() == prompt.input_ids
    np.testing.assert_array_equal(out["pixel_values"], prompt.media[0].pixel_values)
    err = rel_err(our_logits(ours, prompt), ref_logits(ref, prompt))
    assert err <= TOL, f"logits relative error {err:.2e}"


def test_attention_logit_softcapping_is_ignored_as_in_transformers() -> None:
    """transformers' Gemma 3 never passes `attn_logit_softcapping` to its attention (Gemma 2
    did; published Gemma 3 configs leave it null): a config that sets it gives the plain model."""
    from shared.models.gemma3.config import TextArgs
    from shared.models.gemma3.language import LanguageModel
    from shared.testing.fixtures import _randomize
    from shared.testing.gemma3_fixture import text_config

    cfg = {**text_config(True), "attn_logit_softcapping": 2.0}
    config = transformers.Gemma3TextConfig(**cfg, attn_implementation="eager")
    torch.manual_seed(0)
    ref = transformers.Gemma3ForCausalLM(config).eval()
    _randomize(ref, 0)
    ours = LanguageModel(TextArgs.from_dict(config.to_dict()))
    weights = {k: mx.array(v.numpy()) for k, v in ref.state_dict().items()}
    ours.load_weights(list(ours.sanitize(weights).items()), strict=True)
    ids = np.random.default_rng(0).integers(0, 400, size=(1, 30))
    with torch.no_grad():
        expected = ref(torch.tensor(ids)).logits[0].numpy()
    assert rel_err(np.array(ours(mx.array(ids))[0]), expected) <= TOL


def test_bfloat16_stays_close_to_float32(ckpt, models, prompts) -> None:
    from mlx.utils import tree_flatten

    half = load(ckpt("hf"), dtype="bfloat16")
    for module in (half.vision, half.language):
        assert {str(v.dtype) for _, v in tree_flatten(module.parameters())} == {"mlx.core.bfloat16"}
    prompt = half.processor(prompts["one_image"])
    err = rel_err(our_logits(half, prompt), our_logits(models[0], prompt))
    assert err < 5e-2, f"bfloat16 logits drift {err:.2e} from fp32"


def test_serving_needs_no_torch(ckpt) -> None:
    """Runtime dependencies only: loading and generating with an image never imports torch."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
        "import numpy as np; from PIL import Image; from shared.api import load, generate\n"
        "img = Image.fromarray(np.zeros((20, 30, 3), np.uint8))\n"
        "print(len(generate(load(sys.argv[1]), 'Hi', images=[img], max_tokens=4)) >= 0)\n"
        "assert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v}\n"
    )
    repo = Path(__file__).resolve().parents[1]
    argv = [sys.executable, "-c", code, str(ckpt("hf"))]
    out = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
