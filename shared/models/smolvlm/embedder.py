"""Decoder-side half of SmolVLM / Idefics3: put the tile features at the `<image>` tokens.

Positions are the plain 1-D ones of the Llama language model, so nothing else is needed.
"""

from __future__ import annotations

from typing import Any

from shared.loading.config import text_config
from shared.models.merge import PlaceholderEmbedder

# transformers' Idefics3Config / SmolVLMConfig default when config.json does not say.
DEFAULT_IMAGE_TOKEN_ID = 128257


class SmolVLMEmbedder(PlaceholderEmbedder):
    def __init__(self, config: dict[str, Any]) -> None:
        token = config.get("image_token_id", text_config(config).get("image_token_id"))
        self.image_token_id = int(token if token is not None else DEFAULT_IMAGE_TOKEN_ID)
        self.placeholder_ids = [self.image_token_id]
