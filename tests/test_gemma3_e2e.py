"""Gemma 3 through the whole stack (cache, encoder, decoder, gateway as processes) with the
`openai` client: an image turn and a follow-up turn about it give exactly the in-process
greedy text (`shared.api.generate`, itself token-exact with transformers)."""

from __future__ import annotations

import pytest

from shared.api import load
from shared.testing.gemma3_fixture import make_gemma3_checkpoint
from tests.e2e_support import (
    assert_image_chat_matches_in_process,
    data_uri,
    image_part,
    png_bytes,
    user,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    return make_gemma3_checkpoint(tmp_path_factory.mktemp("gemma3") / "hf", "hf")


def test_image_chat_through_the_gateway(checkpoint, tmp_path_factory) -> None:
    reference = load(checkpoint)
    image = data_uri(png_bytes(7, (64, 40)))
    first = user(image_part(image), text="What is in this picture?")
    tmp = tmp_path_factory.mktemp("e2e")
    assert_image_chat_matches_in_process(reference, checkpoint, tmp, first)  # Gemma 3: no video
