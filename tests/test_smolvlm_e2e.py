"""SmolVLM through the whole stack (cache, encoder, decoder, gateway as processes) with the
`openai` client: an image split into tiles, then a follow-up turn about it, give exactly the
in-process greedy text (`shared.api.generate`, itself token-exact with transformers). The
decoder rebuilds the tile layout of the prompt from the feature reference's grid alone."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from services.launcher import Stack
from shared.api import generate, load
from shared.testing.smolvlm_fixture import make_smolvlm_checkpoint
from tests.e2e_support import (
    MAX_TOKENS,
    MODEL_ID,
    data_uri,
    e2e_config,
    image_part,
    png_bytes,
    user,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    return make_smolvlm_checkpoint(tmp_path_factory.mktemp("smolvlm") / "hf", "hf")


def test_image_chat_through_the_gateway(checkpoint, tmp_path_factory) -> None:
    reference = load(checkpoint)
    image = data_uri(png_bytes(7, (30, 64)))  # tall: 3 rows x 2 columns of tiles
    first = user(image_part(image), text="What is in this picture?")
    prompt = reference.processor(first)
    assert prompt.media[0].grid_thw[3:] == (3, 2)
    answer = generate(reference, first, max_tokens=MAX_TOKENS, temperature=0.0)
    follow_up = [*first, {"role": "assistant", "content": answer},
                 {"role": "user", "content": "And what colour dominates it?"}]  # fmt: skip
    with Stack(e2e_config(checkpoint, tmp_path_factory.mktemp("e2e"))) as stack:
        client = openai.OpenAI(base_url=stack.base_url, api_key="x", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [MODEL_ID]
        kwargs: dict[str, Any] = {"model": MODEL_ID, "temperature": 0, "max_tokens": MAX_TOKENS}
        chunks = list(client.chat.completions.create(messages=first, stream=True, **kwargs))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reply = client.chat.completions.create(messages=follow_up, **kwargs)
        with pytest.raises(openai.BadRequestError):  # SmolVLM takes no video
            client.chat.completions.create(
                messages=[{"role": "user", "content": [
                    {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}},
                ]}], **kwargs,
            )  # fmt: skip
    assert answer and streamed == answer
    assert reply.choices[0].message.content == generate(
        reference, follow_up, max_tokens=MAX_TOKENS, temperature=0.0
    )
