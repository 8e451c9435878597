"""`prism` command line. `prism generate` runs one model in this process (flags follow
`mlx_vlm.generate`); the services have their own entry points.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from shared import cpu_blas
from shared.models.kv_quant import config as kv_quant_flags


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt (and images/video) in-process")
    p.add_argument("--model", required=True, help="local folder or Hugging Face Hub id")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument(
        "--image", nargs="+", action="extend", default=[], help="image path(s) or URL(s)"
    )
    p.add_argument("--video", nargs="+", action="extend", default=[], help="video path(s)")
    p.add_argument(
        "--audio", nargs="+", action="extend", default=[], help="audio path(s) or URL(s)"
    )
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
        help="cast floating-point weights (default: as stored; float32 on the CPU with MKL)",
    )
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    kv_quant_flags.add_flags(p)
    p.add_argument(
        "--draft-kind", choices=["draft", "ngram", "eagle3"], default=None,
        help="speculative decoding: a draft model, prompt lookup (no model) or an EAGLE-3 head "
        "(default with --draft-model: eagle3 or draft, from its config)",
    )  # fmt: skip
    p.add_argument("--draft-model", default="", help="the drafter's folder or Hub id")
    p.add_argument("--num-draft-tokens", type=int, default=4, help="tokens drafted per step")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="print prompt/generation tok/s and peak memory on stderr",
    )
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    if args.draft_kind or args.draft_model:
        return _run_speculative(args)
    from shared.api import load, stream_generate

    model = load(args.model, dtype=args.dtype, revision=args.revision)
    last = None
    for chunk in stream_generate(
        model,
        args.prompt,
        images=args.image,
        videos=args.video,
        audios=args.audio,
        system=args.system,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        kv_quant=kv_quant_flags.from_args(args),
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
        print(f"CPU BLAS: {cpu_blas.status()}", file=sys.stderr)
    return 0


def _run_speculative(args: argparse.Namespace) -> int:
    """Drafting lives in the decoder's batched engine, so this path runs one request through
    it (imported lazily: plain `prism generate` never loads the engine)."""
    if args.video or args.audio:
        raise ValueError("--draft-* supports text and --image prompts")
    import logging

    import structlog

    from services.decoder.spec.oneshot import SpecReport, speculative_generate
    from shared.runtime.sampling import SamplingParams

    # stdout carries only the text: the engine's log lines go to stderr, warnings and up.
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )

    sampling = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        seed=args.seed,
    )  # fmt: skip
    report = None
    for item in speculative_generate(
        args.model, args.prompt, images=args.image, system=args.system,
        max_tokens=args.max_tokens, sampling=sampling, draft_kind=args.draft_kind or "",
        draft_model=args.draft_model, num_draft_tokens=args.num_draft_tokens, dtype=args.dtype,
    ):  # fmt: skip
        if isinstance(item, SpecReport):
            report = item
        else:
            sys.stdout.write(item)
            sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose and report is not None:
        print("=" * 10, file=sys.stderr)
        print(f"Prompt: {report.prompt_tokens} tokens", file=sys.stderr)
        print(
            f"Generation: {report.generation_tokens} tokens, "
            f"{report.generation_tps:.3f} tokens-per-sec",
            file=sys.stderr,
        )
        print(
            f"Speculative: acceptance {report.acceptance:.3f} ({report.accepted}/"
            f"{report.drafted} drafted tokens), {report.tokens_per_step:.2f} tokens per target "
            "step",
            file=sys.stderr,
        )
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
