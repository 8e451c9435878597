"""The comparison table: medians of each tool's runs, ratios, identical text, short runs."""

from __future__ import annotations

import statistics

from .runs import Run


def _fmt(values: list[float], digits: int) -> str:
    med = statistics.median(values)
    runs = ", ".join(f"{v:.{digits}f}" for v in values)
    return f"{med:.{digits}f} ({runs})"


def _ratio(a: list[float], b: list[float], higher_is_better: bool) -> str:
    """Ratio of medians, then of each tool's best run (least disturbed by other processes)."""
    best = max if higher_is_better else min
    return f"{statistics.median(a) / statistics.median(b):.2f} (best {best(a) / best(b):.2f})"


def _prism_text(stdout: str) -> str:
    return stdout[:-1] if stdout.endswith("\n") else stdout  # `prism` adds one newline


def _peer_text(stdout: str) -> str:
    """mlx-vlm --verbose prints the templated prompt (ending "<|im_start|>assistant\n") and a
    newline, the text, then "\n==========" and its stats."""
    start = stdout.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n\n")
    return stdout[start : stdout.rindex("\n==========")]


def _ints(runs: list[Run], field: str) -> str:
    return ", ".join(sorted({str(getattr(r, field)) for r in runs}))


METRICS = (  # (label, Run field, digits, higher is better)
    ("prompt tok/s", "prompt_tps", 1, True),
    ("generation tok/s", "gen_tps", 1, True),
    ("peak memory (GB)", "peak_gb", 3, False),
    ("process wall time (s)", "wall_s", 2, False),
)
LOAD_ROW = "1-min load average after each run"


def table(runs: list[Run], cases: dict[str, str]) -> str:
    lines = [
        "| case | metric | prism | mlx-vlm | prism / mlx-vlm |",
        "|---|---|---|---|---|",
    ]
    for case, label in cases.items():
        prism = [r for r in runs if r.case == case and r.tool == "prism"]
        peer = [r for r in runs if r.case == case and r.tool == "mlx-vlm"]
        same = all(
            _prism_text(p.output) == _peer_text(q.output) for p, q in zip(prism, peer, strict=True)
        )
        lines.append(f"| {label} | prompt tokens | {_ints(prism, 'prompt_tokens')} | ")
        lines[-1] += f"{_ints(peer, 'prompt_tokens')} | |"
        lines.append(f"| | generated tokens | {_ints(prism, 'gen_tokens')} | ")
        lines[-1] += f"{_ints(peer, 'gen_tokens')} | |"
        for name, field, digits, higher in METRICS:
            a = [getattr(r, field) for r in prism]
            b = [getattr(r, field) for r in peer]
            ratio = _ratio(a, b, higher)
            lines.append(f"| | {name} | {_fmt(a, digits)} | {_fmt(b, digits)} | {ratio} |")
        loads = [_fmt([r.load for r in rows], 1) for rows in (prism, peer)]
        lines.append(f"| | {LOAD_ROW} | {loads[0]} | {loads[1]} | |")
        lines.append(f"| | identical generated text, every run | {'yes' if same else 'NO'} | | |")
    return "\n".join(lines)


def check_lengths(runs: list[Run], max_tokens: int) -> list[str]:
    """Notes for runs that stopped before max_tokens (an EOS from the random model)."""
    return [
        f"note: {r.tool} {r.case} generated {r.gen_tokens} < {max_tokens} tokens (EOS)"
        for r in runs
        if r.gen_tokens < max_tokens
    ]
