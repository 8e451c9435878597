"""SmolVLM / Idefics3 language model: a plain Llama (`shared.models.llama`).

Weights arrive as `model.*` + `lm_head.*` (Hugging Face `model.text_model.*`, renamed by the
loader) or, from mlx-vlm's converter, without the `model.` level (`embed_tokens`, `layers`,
`norm` directly under `language_model.`); `sanitize` maps the latter back.
"""

from __future__ import annotations

import mlx.core as mx

from shared.models import llama

_BARE = ("embed_tokens.", "layers.", "norm.")


class LanguageModel(llama.Model):
    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        renamed = {("model." + k if k.startswith(_BARE) else k): v for k, v in weights.items()}
        return super().sanitize(renamed)
