"""A real byte-level BPE tokenizer, trained offline on a tiny embedded corpus.

Two styles mirror the published tokenizers the test checkpoints imitate:
- "qwen": Qwen2 pre-tokenizer regex + NFC, the Qwen2/2.5/VL/3 added tokens, no BOS;
- "llama3": Llama 3 regex (digits in groups of 3), `<|begin_of_text|>` added by a
  TemplateProcessing post-processor, as in Meta's `tokenizer.json`.

Training is deterministic and cached per process (a few milliseconds).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

# Vocabulary learnt by BPE, including the 256 byte-level symbols; special tokens follow.
BPE_VOCAB_SIZE = 400

QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# (content, special) in the published id order. In Qwen's files the tool/think markers are
# added tokens with special=False (they survive skip_special_tokens decoding).
QWEN_ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]

LLAMA3_ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|begin_of_text|>", True),
    ("<|end_of_text|>", True),
    ("<|reserved_special_token_0|>", True),
    ("<|reserved_special_token_1|>", True),
    ("<|finetune_right_pad_id|>", True),
    ("<|reserved_special_token_2|>", True),
    ("<|start_header_id|>", True),
    ("<|end_header_id|>", True),
    ("<|eom_id|>", True),
    ("<|eot_id|>", True),
    ("<|python_tag|>", True),
]

STYLES = ("qwen", "llama3")

CORPUS = """\
The quick brown fox jumps over the lazy dog. A picture shows a small red house next to a
tall green tree, and the sky above it is blue with a few white clouds. In the video, a cat
walks across the kitchen table, stops to look at the camera, and then jumps down to the floor.

You are a helpful assistant. The user asks a question and the assistant answers it clearly.
What is in this image? Describe the image in detail. The image contains two people sitting on
a bench in a park. One of them is reading a book, while the other is feeding the birds.
There are 3 dogs, 12 apples and 2024 stars; 7 + 5 = 12, and 100 / 4 = 25.

Large language models read text as tokens. A tokenizer splits the text into pieces, and the
model predicts the next piece, one at a time, until it writes the end of the answer. Vision
language models also look at pictures: the image is cut into patches, each patch becomes a
vector, and the vectors are merged before they reach the language model.

def add(a, b):
    return a + b

print("Hello, world!") # It's a simple program that we'll run; they're happy, I'm sure.
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}

Once upon a time, there was a little robot who wanted to paint the ocean. Every morning it
rolled down to the beach, looked at the waves, and tried to mix the right colors. The water
was never the same color twice, so the robot kept painting, day after day, and it was happy.
"""


def _pattern(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; expected one of {STYLES}")
    return QWEN_PATTERN if style == "qwen" else LLAMA3_PATTERN


def added_tokens(style: str) -> list[tuple[str, bool]]:
    _pattern(style)
    return QWEN_ADDED_TOKENS if style == "qwen" else LLAMA3_ADDED_TOKENS


def train_byte_level_bpe(pattern: str, *, nfc: bool) -> Tokenizer:
    """A byte-level BPE of `BPE_VOCAB_SIZE` tokens trained on `CORPUS`, split by `pattern`
    (NFC-normalized first when `nfc`); no added tokens, no post-processor yet. Shared by the
    styles here and the family fixtures that add their own special tokens."""
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    return tok


@cache
def _trained_json(style: str) -> str:
    """Train the BPE once per process; return the serialized tokenizer."""
    tok = train_byte_level_bpe(_pattern(style), nfc=style == "qwen")
    if tok.get_vocab_size() != BPE_VOCAB_SIZE:
        raise RuntimeError(f"BPE trained to {tok.get_vocab_size()} tokens, want {BPE_VOCAB_SIZE}")
    tok.add_tokens(
        [
            AddedToken(t, special=s, normalized=False, lstrip=False, rstrip=False)
            for t, s in added_tokens(style)
        ]
    )
    if style == "qwen":
        tok.post_processor = processors.ByteLevel(
            add_prefix_space=False, trim_offsets=False, use_regex=False
        )
    else:
        bos = "<|begin_of_text|>"
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos}:0 $A:0",
                    pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                    special_tokens=[(bos, bos_id)],
                ),
            ]
        )
    return tok.to_str()


def build_tokenizer(style: str) -> Tokenizer:
    """A fresh `tokenizers.Tokenizer` (callers may mutate it; the trained one stays cached)."""
    return Tokenizer.from_str(_trained_json(style))


def vocab_size(style: str) -> int:
    return BPE_VOCAB_SIZE + len(added_tokens(style))


def special_token_ids(style: str) -> dict[str, int]:
    """Content -> id for every added token of the style."""
    return {t: BPE_VOCAB_SIZE + i for i, (t, _) in enumerate(added_tokens(style))}


def _added_tokens_decoder(style: str) -> dict[str, dict]:
    return {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": s,
        }
        for (t, s), i in zip(added_tokens(style), special_token_ids(style).values(), strict=True)
    }


def _tokenizer_config(style: str, chat_template: str | None) -> dict:
    """tokenizer_config.json as published on the Hub (transformers-4 era)."""
    if style == "qwen":
        specials = [t for t, s in QWEN_ADDED_TOKENS if s][1:]  # all but <|endoftext|>
        cfg = {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": _added_tokens_decoder(style),
            "additional_special_tokens": specials,
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 32768,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        }
    else:
        cfg = {
            "added_tokens_decoder": _added_tokens_decoder(style),
            "bos_token": "<|begin_of_text|>",
            "clean_up_tokenization_spaces": True,
            "eos_token": "<|eot_id|>",
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 131072,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    return dict(sorted(cfg.items()))


def write_tokenizer(
    style: str, out_dir: Path, chat_template: str | None, *, legacy: bool = False
) -> None:
    """Write `tokenizer.json` + `tokenizer_config.json` (+ `chat_template.jinja`).

    legacy=True: the Hub's transformers-4 files (template inside tokenizer_config.json).
    legacy=False: what transformers 5 `save_pretrained` writes (template in
    `chat_template.jinja`), produced by round-tripping through AutoTokenizer.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if legacy:
        build_tokenizer(style).save(str(out_dir / "tokenizer.json"), pretty=True)
        cfg = _tokenizer_config(style, chat_template)
        (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        return
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(style, Path(tmp), chat_template, legacy=True)
        tok = AutoTokenizer.from_pretrained(tmp)
    tok.save_pretrained(str(out_dir))
