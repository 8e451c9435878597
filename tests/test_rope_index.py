"""M-RoPE position ids vs transformers' Qwen2-VL / Qwen2.5-VL ``get_rope_index`` (torch)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from shared.media.types import MediaInput
from shared.models.qwen2_vl.rope_index import get_rope_index

torch = pytest.importorskip("torch")

IMAGE, VIDEO, START, END = 151655, 151656, 151652, 151653
MERGE = 2


def _reference(model_cls, input_ids, media, tokens_per_second=None):
    """Run transformers' method on a stand-in object: it only reads config and one helper."""
    stub = SimpleNamespace(
        config=SimpleNamespace(
            vision_config=SimpleNamespace(
                spatial_merge_size=MERGE, tokens_per_second=tokens_per_second
            )
        )
    )
    stub.get_vision_position_ids = model_cls.get_vision_position_ids.__get__(stub)
    ids = torch.tensor([input_ids])
    types = torch.zeros_like(ids, dtype=torch.int32)
    types[ids == IMAGE], types[ids == VIDEO] = 1, 2
    images = [m.grid_thw for m in media if m.modality == "image"]
    videos = [m for m in media if m.modality == "video"]
    kwargs = {
        "image_grid_thw": torch.tensor(images) if images else None,
        "video_grid_thw": torch.tensor([m.grid_thw for m in videos]) if videos else None,
    }
    if tokens_per_second is not None and videos:
        # float32, as the processor's BatchFeature hands it to the model
        kwargs["second_per_grid_ts"] = torch.tensor([m.seconds_per_grid for m in videos])
    pos, delta = model_cls.get_rope_index(stub, ids, mm_token_type_ids=types, **kwargs)
    return pos[:, 0].numpy(), int(delta.reshape(-1)[0])


def _media(modality, grid, seconds=None):
    return MediaInput(modality, np.zeros((1, 1), np.float32), grid, seconds)


def _prompt(media, text=(5, 3, 4)):
    """text, then per item: <vision_start> pads <vision_end> text."""
    ids = list(range(10, 10 + text[0]))
    for i, item in enumerate(media):
        pad = IMAGE if item.modality == "image" else VIDEO
        ids += [START] + [pad] * item.num_tokens(MERGE) + [END]
        ids += list(range(100, 100 + text[(i + 1) % len(text)]))
    return ids


def _ours(ids, media, tokens_per_second=None, advance="spatial", **kw):
    """Compared with transformers 5.24, hence its "spatial" rule unless a test says otherwise."""
    return get_rope_index(
        ids,
        media,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=START,
        spatial_merge_size=MERGE,
        tokens_per_second=tokens_per_second,
        advance=advance,
        **kw,
    )


CASES = {
    "text_only": [],
    "one_image": [_media("image", (1, 4, 6))],
    "two_images": [_media("image", (1, 4, 4)), _media("image", (1, 6, 2))],
    # t=6 grids with a 1x1 merged frame: the temporal extent outruns the spatial one
    "image_video": [_media("image", (1, 4, 4)), _media("video", (6, 2, 2), 1.0)],
    "video_image": [_media("video", (3, 4, 6), 2 / 3), _media("image", (1, 2, 8))],
}


@pytest.mark.parametrize("name", list(CASES))
def test_qwen2_vl_matches_transformers(name):
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    media = CASES[name]
    ids = _prompt(media)
    ref_pos, ref_delta = _reference(Qwen2VLModel, ids, media)
    pos, delta = _ours(ids, media)
    assert pos.shape == (3, len(ids)) and pos.dtype == np.int64
    np.testing.assert_array_equal(pos, ref_pos)
    assert delta == ref_delta
    if not media:
        assert delta == 0 and (pos == np.arange(len(ids))).all()


@pytest.mark.parametrize("name", ["one_image", "image_video", "video_image"])
@pytest.mark.parametrize("tps", [2, 25])
def test_qwen2_5_vl_matches_transformers(name, tps):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    media = CASES[name]
    ids = _prompt(media)
    ref_pos, ref_delta = _reference(Qwen2_5_VLModel, ids, media, tokens_per_second=tps)
    pos, delta = _ours(ids, media, tokens_per_second=tps)
    np.testing.assert_array_equal(pos, ref_pos)
    assert delta == ref_delta


def test_grid_tuples_and_adjacent_blocks():
    """Bare grids work (modality from the tokens), and back-to-back items split by size."""
    media = [_media("image", (1, 4, 4)), _media("image", (1, 2, 4))]
    ids = [1, 2] + [IMAGE] * 4 + [IMAGE] * 2 + [3]
    pos, delta = _ours(ids, [m.grid_thw for m in media])
    first = pos[:, 2:6]
    np.testing.assert_array_equal(first, [[2, 2, 2, 2], [2, 2, 3, 3], [2, 3, 2, 3]])
    np.testing.assert_array_equal(pos[:, 6:8], [[4, 4], [4, 4], [4, 5]])
    assert pos[:, 8].tolist() == [6, 6, 6] and delta == 7 - 9


def test_max_advance_is_legacy_qwen():
    """advance="max": text resumes one past the block's largest id (original Qwen / vLLM)."""
    video = _media("video", (4, 2, 2), 1.0)
    ids = [1, VIDEO, VIDEO, VIDEO, VIDEO, 2]
    pos, delta = _ours(ids, [video], tokens_per_second=2, advance="max")
    np.testing.assert_array_equal(pos[0], [0, 1, 3, 5, 7, 8])
    np.testing.assert_array_equal(pos[1], [0, 1, 1, 1, 1, 8])
    assert delta == 9 - 6
    spatial, _ = _ours(ids, [video], tokens_per_second=2)
    assert spatial[:, 5].tolist() == [2, 2, 2]  # transformers 5.24: start + max(h, w) // merge


@pytest.mark.parametrize("name", ["text_only", "one_image", "two_images"])
def test_default_rule_agrees_with_transformers_for_images(name):
    """Images never reach the case where the two rules differ."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    media = CASES[name]
    ids = _prompt(media)
    ref_pos, ref_delta = _reference(Qwen2VLModel, ids, media)
    pos, delta = get_rope_index(
        ids, media, image_token_id=IMAGE, video_token_id=VIDEO, spatial_merge_size=MERGE
    )
    np.testing.assert_array_equal(pos, ref_pos)
    assert delta == ref_delta


def test_mismatch_errors():
    with pytest.raises(ValueError, match="placeholder"):
        _ours([1, IMAGE, IMAGE], [])
    with pytest.raises(ValueError, match="media items"):
        _ours([1, 2], [(1, 2, 2)])
    with pytest.raises(ValueError, match="modality"):
        _ours([VIDEO], [_media("image", (1, 2, 2))])
