"""Prism's OpenAI server vs `mlx_vlm.server` (mlx-vlm 0.7.10) under the same streaming load.

    .venv/bin/python bench/serve_vs_mlx_vlm.py --make-small                 # CPU: levels 1,8
    .venv/bin/python bench/serve_vs_mlx_vlm.py --model /ckpt --concurrency 1,8,32 \\
        --device-note "1x H100, MLX 0.32.4 CUDA"

Both servers run on loopback, on the same checkpoint (an mlx-layout folder, which both load;
`--make-small` writes the random-weight Qwen2.5-VL "small" preset of `bench/make_checkpoint.py`
in bf16), side by side for the whole run: Prism through its launcher (`python -m
services.launcher`: cache, encoder, decoder, gateway, each on a free port) with
`--prism-python`, mlx-vlm with `--peer-python -m mlx_vlm.server`. The peer's virtualenv lives
outside the repo:

    python3 -m venv /tmp/peer-venv
    /tmp/peer-venv/bin/pip install mlx-vlm==0.7.10 'mlx[cpu]==0.32.4'   # mlx[cuda] on a GPU

Load: for each prompt kind (text only; one image per request) and each concurrency level C,
`--requests-per-level` requests (default max(4, 2C)) go out through C closed-loop workers, each
a streaming `/v1/chat/completions` (greedy, `max_tokens`, `stream_options.include_usage`). The
two servers take turns level by level (the one that goes first alternates), so a noisy machine
disturbs both alike. Every request is distinct: its text starts with its own tag, and each
image is its own 448x448 noise picture (seeded by level and index), so neither feature caches
nor prefix caches hit. One warm-up request per server and kind goes first and is not counted.

Per request: TTFT (send -> first SSE chunk with text in `content`, `reasoning` or
`reasoning_content`), the gaps between such chunks (ITL as a client sees it: a chunk carrying
several tokens, or a token a server holds back, e.g. an incomplete UTF-8 sequence or a skipped
special token, shows as one long gap), TPOT ((last chunk - first chunk) / (tokens - 1): per
token, whatever the chunking) and output tokens (the usage chunk's `completion_tokens`, else
the text chunks). Per level: aggregate output tok/s = all tokens / (last response end - first
request start). "same text" compares each request's text between the servers, ignoring special
tokens, <think> tags and non-ASCII (the two detokenizers print those differently for the same
tokens). "load" is the machine's 1-minute load average when the level ended: on a shared
machine, compare rows with similar load. Failures (HTTP errors, dropped streams, a crashed
server) are counted and shown, never fatal; a server that died is restarted before its next
level (one that fails to start twice is given up on).
"""

from __future__ import annotations

from serving.cli import main  # bench/serving/: servers, load, report, context, cli

if __name__ == "__main__":
    raise SystemExit(main(description=__doc__))
