"""Qwen2-Audio in MLX against transformers' `Qwen2AudioForConditionalGeneration` (fp32, CPU).

A tiny random checkpoint (16 mel bins, 2 s chunks, 2+2 layers) written by
`shared.testing.qwen2_audio_fixture`; clips are synthetic (tones + noise), made here. Checked:
the prompt ids and log-mel features against `Qwen2AudioProcessor`, the projected audio features
and the logits of every prompt position within 1e-4 relative, 32 greedy tokens identical, for one
short clip, two clips in one turn (one longer than the chunk, so cut) and one clip per turn of a
multi-turn conversation; then the other checkpoint layouts, 4-bit included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import base64  # noqa: E402

from shared.media.audio import encode_wav  # noqa: E402
from shared.runtime.generate import encode_media, prefill, prepare_inputs, stream_generate  # noqa: E402
from shared.runtime.loaded import load_model  # noqa: E402
from shared.testing.qwen2_audio_fixture import (  # noqa: E402
    SAMPLING_RATE,
    make_qwen2_audio_checkpoint,
)

TOL = 1e-4
N_NEW = 32


def clip(seconds: float, freq: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    noise = np.random.default_rng(seed).normal(0, 0.05, t.size)
    return (0.4 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def user(*parts: Any) -> dict[str, Any]:
    return {"role": "user", "content": list(parts)}


def audio(samples: np.ndarray) -> dict[str, Any]:
    return {"type": "audio", "audio": samples}


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


CONVERSATIONS = {
    "one_short_clip": [user(audio(clip(0.73, 440, 1)), text("What is that sound?"))],
    "two_clips_one_cut": [
        user(audio(clip(1.31, 300, 2)), audio(clip(2.6, 900, 3)), text("Compare them.")),
    ],
    "clip_per_turn": [
        user(audio(clip(0.5, 200, 4)), text("What is this?")),
        {"role": "assistant", "content": "A low tone."},
        user(audio(clip(1.1, 1200, 5)), text("And this one?")),
    ],
}


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qwen2_audio")


def checkpoint(root: Path, layout: str) -> Path:
    path = root / layout
    if not path.exists():
        make_qwen2_audio_checkpoint(path, layout)
    return path


@pytest.fixture(scope="module")
def hf_path(ckpt_root: Path) -> Path:
    return checkpoint(ckpt_root, "hf")


@pytest.fixture(scope="module")
def model(hf_path: Path) -> Any:
    return load_model(hf_path)


@pytest.fixture(scope="module")
def reference(hf_path: Path) -> Any:
    from transformers import Qwen2AudioForConditionalGeneration

    return Qwen2AudioForConditionalGeneration.from_pretrained(str(hf_path), dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_processor(hf_path: Path) -> Any:
    from transformers import Qwen2AudioProcessor

    return Qwen2AudioProcessor.from_pretrained(str(hf_path))


def main(features: Any) -> np.ndarray:
    """The features merged at the placeholders (an array, or `MediaFeatures.features`)."""
    return np.array(getattr(features, "features", features))


def all_logits(model: Any, prompt: Any, features: list[Any]) -> np.ndarray:
    """Every prompt position's logits from one uncached forward pass."""
    pre = prepare_inputs(model, prompt, features)
    lm = model.language
    return np.array(lm(pre.input_ids, lm.make_cache(), input_embeddings=pre.input_embeddings)[0])


def last_logits(model: Any, prompt: Any, features: list[Any]) -> np.ndarray:
    """The last position's logits through the chunked prefill `stream_generate` uses."""
    pre = prepare_inputs(model, prompt, features)
    return np.array(prefill(model.language, pre, model.language.make_cache())[0])


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def clips_of(messages: list[dict[str, Any]]) -> list[np.ndarray]:
    return [p["audio"] for m in messages if isinstance(m["content"], list) for p in m["content"]
            if p.get("type") == "audio"]  # fmt: skip


def hf_inputs(hf_processor: Any, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """What transformers' own processor makes of the conversation."""
    prompt = hf_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return hf_processor(
        text=prompt, audio=clips_of(messages), sampling_rate=SAMPLING_RATE, return_tensors="pt"
    )


def hf_logits(reference: Any, inputs: dict[str, Any], ids: list[int]) -> np.ndarray:
    kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        return reference(input_ids=torch.tensor([ids]), **kwargs).logits[0].numpy()


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_processor_matches_transformers(model: Any, hf_processor: Any, name: str) -> None:
    messages = CONVERSATIONS[name]
    ours = model.processor(messages)
    theirs = hf_inputs(hf_processor, messages)
    assert ours.input_ids == theirs["input_ids"][0].tolist()
    frames = theirs["feature_attention_mask"].sum(-1).tolist()
    assert [m.grid_thw[0] for m in ours.media] == frames
    mel = np.concatenate([m.pixel_values for m in ours.media])
    # Ours is the numpy STFT, theirs torch's (transformers picks torch when it is importable).
    assert np.abs(mel - theirs["input_features"].numpy()).max() < 1e-4


def both_inputs(model: Any, hf_processor: Any, name: str) -> tuple[Any, dict[str, Any]]:
    """One conversation as our processor and as transformers' processor prepare it."""
    messages = CONVERSATIONS[name]
    return model.processor(messages), hf_inputs(hf_processor, messages)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_features_and_logits_match_transformers(
    model: Any, reference: Any, hf_processor: Any, name: str
) -> None:
    prompt, inputs = both_inputs(model, hf_processor, name)
    captured: list[torch.Tensor] = []
    hook = reference.model.multi_modal_projector.register_forward_hook(
        lambda _m, _i, out: captured.append(out)
    )
    try:
        logits = hf_logits(reference, inputs, prompt.input_ids)
    finally:
        hook.remove()
    tokens = [m.tokens for m in prompt.media]
    expected = np.concatenate([captured[0][i, :n].numpy() for i, n in enumerate(tokens)])
    features = encode_media(model, prompt.media)
    assert rel_err(np.concatenate([main(f) for f in features]), expected) < TOL
    assert rel_err(all_logits(model, prompt, features), logits) < TOL
    assert rel_err(last_logits(model, prompt, features), logits[-1]) < TOL


def reference_greedy(reference: Any, inputs: dict[str, Any], ids: list[int], n: int) -> list[int]:
    """Greedy decoding by full re-computation each step: no cache, no generate() machinery."""
    ids, out = list(ids), []
    for _ in range(n):
        token = int(np.argmax(hf_logits(reference, inputs, ids)[-1]))
        out.append(token)
        ids.append(token)
    return out


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_greedy_32_tokens_match_transformers(
    model: Any, reference: Any, hf_processor: Any, name: str
) -> None:
    prompt, inputs = both_inputs(model, hf_processor, name)
    expected = reference_greedy(reference, inputs, prompt.input_ids, N_NEW)
    ours = [c.token for c in stream_generate(model, prompt, max_tokens=N_NEW)]
    # Ours stops at EOS (the two-clip prompt meets <|endoftext|> at token 19); the reference
    # runs on: identical up to there, and every token before it identical too.
    assert ours == expected[: len(ours)]
    assert len(ours) == N_NEW or (ours[-1] in model.eos_token_ids and len(ours) >= 16)
    assert len(set(ours)) > 4  # not a degenerate repetition


@pytest.mark.parametrize("layout", ["hf-legacy", "mlx"])
def test_other_layouts_give_the_same_logits(
    ckpt_root: Path, model: Any, reference: Any, hf_processor: Any, layout: str
) -> None:
    messages = CONVERSATIONS["one_short_clip"]
    other = load_model(checkpoint(ckpt_root, layout))
    prompt = other.processor(messages)
    logits = hf_logits(reference, hf_inputs(hf_processor, messages), prompt.input_ids)
    assert rel_err(all_logits(other, prompt, encode_media(other, prompt.media)), logits) < TOL


@pytest.mark.parametrize("layout", ["mlx-4bit", "mlx-8bit"])
def test_mlx_quantized_loads_and_tracks_fp32(ckpt_root: Path, model: Any, layout: str) -> None:
    import mlx.nn as nn

    q = load_model(checkpoint(ckpt_root, layout))
    assert isinstance(q.language.model.layers[0].mlp.gate_proj, nn.QuantizedLinear)
    assert not isinstance(q.vision.audio_tower.layers[0].fc1, nn.QuantizedLinear)
    messages = CONVERSATIONS["one_short_clip"]
    prompt = q.processor(messages)
    feats_q = encode_media(q, prompt.media)
    feats = encode_media(model, prompt.media)
    # The audio tower is not quantized: its features are the fp32 model's.
    assert rel_err(main(feats_q[0]), main(feats[0])) < TOL
    logits_q, logits = last_logits(q, prompt, feats_q), last_logits(model, prompt, feats)
    assert np.corrcoef(logits_q, logits)[0, 1] > 0.9
    tokens = [c.token for c in stream_generate(q, prompt, max_tokens=4)]
    assert len(tokens) >= 1


def test_generate_from_encoded_wav_and_flac(model: Any) -> None:
    samples = clip(0.9, 500, 7)
    for codec in ("pcm_s16le", "flac"):
        data = encode_wav(samples, SAMPLING_RATE, codec)
        part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode()}}
        prompt = model.processor([user(part, text("Hi"))])
        assert prompt.media[0].grid_thw == (90,)
        assert prompt.input_ids.count(model.processor.audio_token_id) == 22
        assert mx.array(prompt.media[0].pixel_values).shape == (1, 16, 200)


def test_prism_generate_audio_flag(model: Any, hf_path: Path, tmp_path: Path, capsys) -> None:
    from services.cli import main
    from shared.api import generate

    wav = tmp_path / "clip.wav"
    wav.write_bytes(encode_wav(clip(0.8, 700, 9), 22050))
    argv = ["generate", "--model", str(hf_path), "--prompt", "What is it?", "--max-tokens", "8"]
    assert main([*argv, "--audio", str(wav)]) == 0
    expected = generate(model, "What is it?", audios=[str(wav)], max_tokens=8)
    assert capsys.readouterr().out == expected + "\n"
    assert main([*argv, "--image", str(wav)]) == 2
    assert "does not accept image input; it accepts: text, audio" in capsys.readouterr().err
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEnot really")
    assert main([*argv, "--audio", str(tmp_path / "bad.wav")]) == 2
    assert capsys.readouterr().err.startswith("prism: error: could not open audio")


def test_encoder_engine_stores_audio_features_by_content(model: Any) -> None:
    import asyncio

    from services.encoder.engine import EncoderEngine, MediaItemInput
    from shared.errors import InvalidRequestError
    from shared.models.qwen2_vl.messages import MediaRef
    from tests.test_encoder_service import MemoryCache

    data = encode_wav(clip(1.0, 440, 11), SAMPLING_RATE)
    cache = MemoryCache()

    async def run() -> None:
        engine = EncoderEngine({"a": model}, cache)
        (first,) = await engine.encode("a", [MediaItemInput("audio", data)])
        assert not first.cache_hit and first.ref.grid == (100,) and first.ref.num_tokens == 25
        fresh = EncoderEngine({"a": model}, cache)  # no memo: the ref comes from the cache
        (again,) = await fresh.encode("a", [MediaItemInput("audio", data)])
        assert again.cache_hit and again.ref == first.ref  # rebuilt from the entry's header
        stored = cache.entries[first.ref.key]["features"]
        media = model.processor.load_media(MediaRef("audio", data))
        expected = main(encode_media(model, [media])[0])
        assert rel_err(np.array(stored), expected) < TOL
        for item, needle in [
            (MediaItemInput("audio", b"\x89PNG\r\n\x1a\n" + bytes(64)), "could not decode audio"),
            (MediaItemInput("image", data), "does not accept image input"),
        ]:
            with pytest.raises(InvalidRequestError, match=needle):
                await engine.encode("a", [item])

    asyncio.run(run())


def test_encoder_and_decoder_halves_load_separately(ckpt_root: Path) -> None:
    """The encoder service holds only the audio tower + projector, the decoder only the LM."""
    from mlx.utils import tree_flatten

    from shared.models.qwen2_audio.audio import AudioTower

    path = checkpoint(ckpt_root, "mlx-4bit")
    tower = load_model(path, components=["vision"])
    assert tower.language is None and tower.embedder is None
    assert isinstance(tower.vision, AudioTower)
    lm = load_model(path, components=["language"])
    assert lm.vision is None and lm.language is not None and lm.embedder is not None
    names = {k for k, _ in tree_flatten(tower.vision.parameters())}
    assert {"audio_tower.conv1.weight", "multi_modal_projector.linear.weight"} <= names
    assert not any("embed_tokens" in k for k in names)


def test_sparse_published_config_reads_as_transformers_does() -> None:
    """The Hub's Qwen2-Audio-7B-Instruct config.json stores only non-default text and audio
    fields; the defaults filled in must be transformers' own."""
    from transformers import Qwen2AudioConfig

    from shared.models.qwen2 import ModelArgs
    from shared.models.qwen2_audio.config import audio_args, audio_token_id, language_config

    published = {
        "audio_config": {"model_type": "qwen2_audio_encoder"},
        "audio_token_index": 151646,
        "model_type": "qwen2_audio",
        "text_config": {
            "intermediate_size": 11008,
            "max_position_embeddings": 8192,
            "model_type": "qwen2",
            "rms_norm_eps": 1e-05,
            "vocab_size": 156032,
        },
    }
    hf = Qwen2AudioConfig(**published)
    text = ModelArgs.from_dict(language_config(published))
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size",
                  "num_attention_heads", "num_key_value_heads", "rms_norm_eps"):  # fmt: skip
        assert getattr(text, field) == getattr(hf.text_config, field), field
    assert text.tie_word_embeddings == hf.text_config.tie_word_embeddings
    theta = hf.text_config.rope_parameters["rope_theta"]
    inv_freq = theta ** -(np.arange(0, text.head_dim, 2) / text.head_dim)
    assert np.allclose(np.array(text.make_rope()._inv_freq), inv_freq, rtol=1e-6)
    audio = audio_args(published)
    for field in ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads",
                  "encoder_ffn_dim", "max_source_positions"):  # fmt: skip
        assert getattr(audio, field) == getattr(hf.audio_config, field), field
    assert audio.projection_dim == hf.text_config.hidden_size
    assert audio_token_id(published) == hf.audio_token_id == 151646
