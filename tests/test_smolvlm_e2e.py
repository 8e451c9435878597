"""SmolVLM through the whole stack (cache, encoder, decoder, gateway as processes) with the
`openai` client: an image split into tiles, then a follow-up turn about it, give exactly the
in-process greedy text (`shared.api.generate`, itself token-exact with transformers). The
decoder rebuilds the tile layout of the prompt from the feature reference's grid alone."""

from __future__ import annotations

import pytest

from shared.api import load
from shared.testing.smolvlm_fixture import make_smolvlm_checkpoint
from tests.e2e_support import (
    assert_image_chat_matches_in_process,
    data_uri,
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
    tmp = tmp_path_factory.mktemp("e2e")
    assert_image_chat_matches_in_process(reference, checkpoint, tmp, first)  # SmolVLM: no video
