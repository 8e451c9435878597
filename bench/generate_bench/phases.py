"""Time per phase (preprocessing, vision, prefill, decode) inside each tool (--phases)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .report import _fmt

# Each prints one JSON line per repeat: times in ms. "prefill" is prompt time minus the vision
# tower evaluated on its own, so it includes merging the features and the first token.
PRISM_PHASES = r"""
import json, sys, time
import mlx.core as mx
from shared.api import load, build_messages
from shared.runtime import generate as G
from shared.runtime.sampling import SamplingParams
model_path, image, prompt, max_tokens, repeats = sys.argv[1:6]
model = load(model_path)
messages = build_messages(prompt, images=[image] if image != "-" else [])
lm = model.language
def prefill_split(inputs):  # what mlx-vlm does: n-1 tokens (only the KV cache kept), then 1
    ids, emb, pos = inputs.input_ids, inputs.input_embeddings, inputs.position_ids
    cut_emb = lambda s: None if emb is None else emb[:, s]  # (1, L, D)
    cut_pos = lambda s: None if pos is None else pos[..., s]  # (3, 1, L)
    cache = lm.make_cache()
    n = ids.shape[1]
    head = slice(0, n - 1)
    lm.model(ids[:, head], cache, cut_emb(head), cut_pos(head))
    mx.eval([c.state for c in cache])
    last = slice(n - 1, n)
    out = lm(ids[:, last], cache, input_embeddings=cut_emb(last), position_ids=cut_pos(last))
    mx.eval(mx.argmax(out[:, -1], -1))
for rep in range(int(repeats) + 1):  # the first pass warms up and is not printed
    t0 = time.perf_counter()
    p = model.processor(messages)
    t1 = time.perf_counter()
    feats = G.encode_media(model, p.media); mx.eval([f.tensors() for f in feats])
    t2 = time.perf_counter()
    inputs = G.prepare_inputs(model, p, feats)
    mx.eval([x for x in (inputs.input_embeddings, inputs.position_ids) if x is not None])
    t3 = time.perf_counter()
    mx.eval(G.prefill(lm, inputs, lm.make_cache()))
    t4 = time.perf_counter()
    prefill_split(inputs)
    t5 = time.perf_counter()
    for c in G.stream_generate(model, p, max_tokens=int(max_tokens), sampling=SamplingParams()):
        last = c
    prompt_ms = 1e3 * last.prompt_tokens / last.prompt_tps
    print(json.dumps({"preprocess": 1e3 * (t1 - t0), "vision": 1e3 * (t2 - t1),
        "prompt": prompt_ms, "prefill": prompt_ms - 1e3 * (t2 - t1),
        "prefill_alone": 1e3 * (t4 - t3), "prefill_split_alone": 1e3 * (t5 - t4),
        "decode_ms_per_token": 1e3 / last.generation_tps, "tokens": last.generation_tokens})
        if rep else "")
"""

PEER_PHASES = r"""
import json, sys, time
import mlx.core as mx
from mlx_vlm import load
from mlx_vlm.prompt_utils import apply_chat_template
from mlx_vlm.generate.dispatch import _prepare_generation_inputs, stream_generate
model_path, image, prompt, max_tokens, repeats = sys.argv[1:6]
model, processor = load(model_path)
images = [image] if image != "-" else None
text = apply_chat_template(processor, model.config, prompt, num_images=len(images or []))
dtype = model.vision_tower.patch_embed.proj.weight.dtype
for rep in range(int(repeats) + 1):  # the first pass warms up and is not printed
    t0 = time.perf_counter()
    ids, pixels, mask, data = _prepare_generation_inputs(
        model, processor, text, images, None, None, {})
    mx.eval(ids) if pixels is None else mx.eval(ids, pixels)
    t1 = time.perf_counter()
    if pixels is not None:
        mx.eval(model.vision_tower(pixels.astype(dtype), data["image_grid_thw"],
                                   output_hidden_states=False))
    t2 = time.perf_counter()
    for r in stream_generate(model, processor, text, images, max_tokens=int(max_tokens),
                             temperature=0.0):
        last = r
    prompt_ms = 1e3 * last.prompt_tokens / last.prompt_tps
    print(json.dumps({"preprocess": 1e3 * (t1 - t0), "vision": 1e3 * (t2 - t1),
        "prompt": prompt_ms, "prefill": prompt_ms - 1e3 * (t2 - t1),
        "decode_ms_per_token": 1e3 / last.generation_tps, "tokens": last.generation_tokens})
        if rep else "")
"""

PHASE_ROWS = (
    ("image preprocessing (ms)", "preprocess"),
    ("vision tower, evaluated alone (ms)", "vision"),
    ("prompt = vision + prefill + 1st token (ms)", "prompt"),
    ("prefill = prompt - vision (ms)", "prefill"),
    ("prefill alone, as prism does it (ms)", "prefill_alone"),
    ("prefill alone, last token split off (ms)", "prefill_split_alone"),
    ("decode (ms / token)", "decode_ms_per_token"),
)


def phases(python: Path, code: str, args: list[str], cwd: Path) -> list[dict[str, float]]:
    proc = subprocess.run(
        [str(python), "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if proc.returncode != 0:
        sys.exit(f"phase timing failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def phase_table(prism: list[dict[str, float]], peer: list[dict[str, float]]) -> str:
    lines = ["| phase | prism | mlx-vlm |", "|---|---|---|"]
    for label, key in PHASE_ROWS:
        cells = []
        for rows in (prism, peer):
            values = [r[key] for r in rows if key in r]
            digits = 2 if key.startswith("decode") else 0
            cells.append(_fmt(values, digits) if values else "-")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)
