"""EAGLE-3 drafter heads (speculators / EAGLE checkpoint layouts)."""

from .config import Eagle3Args, is_eagle3_config
from .model import Eagle3Model

__all__ = ["Eagle3Args", "Eagle3Model", "is_eagle3_config", "load_eagle3"]


def load_eagle3(path: str) -> Eagle3Model:
    """Read a speculators / EAGLE-3 checkpoint folder (config.json + *.safetensors)."""
    import json
    from pathlib import Path

    from shared.loading import weights as W

    config = json.loads((Path(path) / "config.json").read_text())
    if not is_eagle3_config(config):
        raise ValueError(f"{path} is not an EAGLE-3 checkpoint (no eagle3 config fields)")
    raw = W.read_weights(Path(path))
    keys = set(raw)
    own = any(k.endswith("embed_tokens.weight") for k in keys)
    model = Eagle3Model(
        Eagle3Args.from_config(config), own_embedding=own, fc_bias="fc.bias" in keys
    )
    return W.load_module(model, raw, None, model.sanitize)  # type: ignore[return-value]
