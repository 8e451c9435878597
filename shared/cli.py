"""`prism` command line. `prism generate` runs one model in this process (flags follow
`mlx_vlm.generate`); the services have their own entry points.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt (and images/video) in-process")
    p.add_argument("--model", required=True, help="local folder or Hugging Face Hub id")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument(
        "--image", nargs="+", action="extend", default=[], help="image path(s) or URL(s)"
    )
    p.add_argument("--video", nargs="+", action="extend", default=[], help="video path(s)")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="cast floating-point weights (default: as stored)",
    )
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="print prompt/generation tok/s and peak memory on stderr",
    )
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from shared.api import load, stream_generate

    model = load(args.model, dtype=args.dtype, revision=args.revision)
    last = None
    for chunk in stream_generate(
        model,
        args.prompt,
        images=args.image,
        videos=args.video,
        system=args.system,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
    ):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    sys.stdout.write("\n")
    if args.verbose and last is not None:
        print("=" * 10, file=sys.stderr)
        print(
            f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec",
            file=sys.stderr,
        )
        print(
            f"Generation: {last.generation_tokens} tokens, "
            f"{last.generation_tps:.3f} tokens-per-sec",
            file=sys.stderr,
        )
        print(f"Peak memory: {last.peak_memory_gb:.3f} GB", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prism", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    args = parser.parse_args(argv)
    from shared.loading.hub import ModelNotFoundError
    from shared.models.registry import UnsupportedModelError

    try:
        return args.func(args)
    except (ModelNotFoundError, UnsupportedModelError, FileNotFoundError, ValueError) as exc:
        print(f"prism: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
