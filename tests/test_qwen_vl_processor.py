"""Qwen-VL preprocessing: media loading, image/video patches vs transformers, prompt building."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from shared.media.image import load_image
from shared.media.types import MediaInput
from shared.media.video import load_video, num_sampled_frames, sample_frame_indices
from shared.models.qwen2_vl.processor import QwenVLProcessor


@pytest.fixture(scope="module", params=[("qwen2_vl", True), ("qwen2_5_vl", False)])
def processor(request, tmp_path_factory):
    """Processor files only (no weights) as the test checkpoints write them: Hub-era files
    (template in tokenizer_config.json + chat_template.json) and transformers-5 files."""
    from shared.testing.fixtures import preprocessor_config, video_preprocessor_config
    from shared.testing.templates import TEMPLATES
    from shared.testing.tokenizer import write_tokenizer

    family, legacy = request.param
    folder = tmp_path_factory.mktemp(family)
    write_tokenizer("qwen", folder, TEMPLATES[family], legacy=legacy)
    configs = {
        "preprocessor_config.json": preprocessor_config(family, legacy=legacy),
        "video_preprocessor_config.json": video_preprocessor_config(family),
    }
    if legacy:
        configs["chat_template.json"] = {"chat_template": TEMPLATES[family]}
    for name, cfg in configs.items():
        (folder / name).write_text(json.dumps(cfg))
    return QwenVLProcessor.from_pretrained(folder)


def _image(width=70, height=50, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _write_video(path, n_frames=12, size=(64, 48), fps=6):
    import av

    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n_frames):
            frame = np.full((height, width, 3), i * 20, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ---- images -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(70, 50), (20, 300)])
def test_image_matches_transformers_pil_processor(processor, size):
    image = _image(*size)
    ref = processor.image_processor(images=image)
    item = processor.process_image(image)
    assert item.modality == "image" and item.seconds_per_grid is None
    assert item.grid_thw == tuple(ref["image_grid_thw"][0].tolist())
    assert item.pixel_values.dtype == np.float32
    np.testing.assert_array_equal(item.pixel_values, ref["pixel_values"])


def test_load_image_sources(tmp_path):
    image = _image()
    data = _png(image)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    expected = np.asarray(image)
    for source in (str(path), path, data, url, base64.b64encode(data).decode(), image):
        np.testing.assert_array_equal(np.asarray(load_image(source)), expected)


def test_load_image_alpha_palette_and_exif():
    rgba = Image.new("RGBA", (4, 2), (10, 20, 30, 0))
    assert np.asarray(load_image(_png(rgba))).tolist() == [[[255, 255, 255]] * 4] * 2
    assert load_image(rgba.convert("P")).mode == "RGB"
    wide = _image(6, 2)
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    wide.save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (2, 6)


@pytest.mark.parametrize(
    "bad", [b"definitely not an image", "data:image/png;base64,aGVsbG8=", _png(_image())[:60]]
)
def test_corrupt_image_is_value_error(bad):
    with pytest.raises(ValueError):
        load_image(bad)


def test_missing_path_is_value_error(tmp_path):
    with pytest.raises(ValueError, match="file path"):
        load_image(str(tmp_path / "missing.png"))


# ---- videos -------------------------------------------------------------------------------


def test_two_identical_frames_equal_the_image(processor):
    frame = np.asarray(_image(70, 50, seed=1))
    image = processor.process_image(Image.fromarray(frame))
    video = processor.process_video(np.stack([frame, frame]), fps=2.0)
    assert video.modality == "video" and video.grid_thw == image.grid_thw
    assert video.seconds_per_grid == 1.0
    np.testing.assert_array_equal(video.pixel_values, image.pixel_values)


def test_video_temporal_layout_and_odd_padding(processor):
    """Columns are (C, T, ph, pw): slot t of temporal patch g holds frame 2g+t; an odd count
    repeats the last frame."""
    frames = [np.asarray(_image(56, 56, seed=s)) for s in range(3)]
    video = processor.process_video(np.stack(frames), fps=4.0)
    per_frame = [processor.process_image(Image.fromarray(f)).pixel_values for f in frames]
    n = per_frame[0].shape[0]
    assert video.grid_thw == (2, 4, 4) and video.seconds_per_grid == 0.5
    v = video.pixel_values.reshape(2, n, 3, 2, 14 * 14)
    for g, pair in enumerate([(0, 1), (2, 2)]):
        for slot, f in enumerate(pair):
            image = per_frame[f].reshape(n, 3, 2, 14 * 14)[:, :, 0]
            np.testing.assert_array_equal(v[g, :, :, slot], image)


def test_frame_sampling_arithmetic():
    # 10 s at 30 fps, 2 fps -> 20 frames; 1 s clip -> min_frames 4; odd counts floor to even
    assert num_sampled_frames(300, 30.0, fps=2.0) == 20
    assert num_sampled_frames(30, 30.0, fps=2.0) == 4
    assert num_sampled_frames(7, 1.0, fps=1.0) == 6
    assert num_sampled_frames(3000, 30.0, fps=2.0, max_frames=11) == 10
    assert num_sampled_frames(1, 30.0) == 1  # a single frame is still a (padded) video
    assert num_sampled_frames(100, 25.0, fps=None, num_frames=11) == 12
    assert num_sampled_frames(100, 25.0, fps=None, num_frames=9) == 8  # round() as transformers
    assert sample_frame_indices(12, 4).tolist() == [0, 3, 6, 9]
    assert sample_frame_indices(10, 4).tolist() == [0, 2, 5, 7]


def test_load_video_path_and_bytes(tmp_path):
    path = _write_video(tmp_path / "clip.mp4")
    clip = load_video(str(path))  # 2 s at 6 fps, sampled at 2 fps -> 4 frames
    assert clip.frames.shape == (4, 48, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.indices == [0, 3, 6, 9] and clip.total_frames == 12
    assert clip.fps == pytest.approx(2.0)
    assert clip.timestamps == pytest.approx([0.0, 0.5, 1.0, 1.5])
    # mpeg4 is lossy; frame i was filled with i * 20
    np.testing.assert_allclose(clip.frames.mean(axis=(1, 2, 3)), [0, 60, 120, 180], atol=4)
    again = load_video(path.read_bytes(), fps=4.0)
    assert again.frames.shape[0] == 8 and again.fps == pytest.approx(4.0)
    with pytest.raises(ValueError):
        load_video(b"not a video at all")


# ---- prompts ------------------------------------------------------------------------------


def test_render_two_images(processor):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "unused.png"},
                {"type": "text", "text": "Compare"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,xx"}},
                {"type": "text", "text": " these."},
            ],
        }
    ]
    assert processor.render(messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Compare"
        "<|vision_start|><|image_pad|><|vision_end|> these.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_call_expands_placeholders(processor, tmp_path):
    png = _png(_image(70, 50))
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    video = _write_video(tmp_path / "clip.mp4")
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": png},
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "video", "video": str(video)},
                "Describe.",
            ],
        },
    ]
    out = processor(messages)
    assert [m.modality for m in out.media] == ["image", "image", "video"]
    image_tokens = out.media[0].num_tokens(2)
    video_tokens = out.media[2].num_tokens(2)
    assert out.media[2].grid_thw[0] == 2 and out.media[2].seconds_per_grid == pytest.approx(1.0)
    ids = np.asarray(out.input_ids)
    assert (ids == processor.image_token_id).sum() == 2 * image_tokens
    assert (ids == processor.video_token_id).sum() == video_tokens
    # every run of pads sits between <|vision_start|> and <|vision_end|>
    starts = np.flatnonzero(ids == processor.vision_start_token_id)
    ends = np.flatnonzero(ids == processor.vision_end_token_id)
    assert (ends - starts - 1).tolist() == [image_tokens, image_tokens, video_tokens]
    text_ids = processor.tokenizer.encode(processor.render(messages), add_special_tokens=False)
    assert len(ids) == len(text_ids) + 2 * (image_tokens - 1) + video_tokens - 1


def test_build_prompt_checks_media(processor):
    image = MediaInput("image", np.zeros((16, 1176), np.float32), (1, 4, 4))
    video = MediaInput("video", np.zeros((32, 1176), np.float32), (2, 4, 4), 1.0)
    text = (
        "a<|vision_start|><|image_pad|><|vision_end|>b<|vision_start|><|video_pad|><|vision_end|>"
    )
    ids = processor.build_prompt(text, [image, video]).input_ids
    assert ids.count(processor.image_token_id) == 4 and ids.count(processor.video_token_id) == 8
    with pytest.raises(ValueError, match="placeholders"):
        processor.build_prompt(text, [image])
    with pytest.raises(ValueError, match="does not match"):
        processor.build_prompt(text, [video, image])


def test_unsupported_part_type(processor):
    with pytest.raises(ValueError, match="audio"):
        processor([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}])
