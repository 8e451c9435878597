"""Per-level statistics and the Markdown tables: absolute numbers and Prism / mlx-vlm."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from .load import Result


@dataclass
class Row:
    server: str
    kind: str
    concurrency: int
    requests: int
    ok: int
    tokens: int
    wall_s: float
    tok_s: float
    ttft_p50: float
    ttft_p90: float
    itl_p50: float
    itl_p90: float
    tpot_p50: float
    e2e_p50: float
    tokens_per_request: float
    prompt_tokens_per_request: float
    errors: list[str]
    note: str = ""
    load1: float = math.nan  # the machine's 1-minute load average when the level ended
    phases: dict[str, float] = field(default_factory=dict)  # Prism: mean s per TTFT phase
    results: list[Result] = field(default_factory=list, repr=False)


def pct(values: list[float], q: float) -> float:
    """The q-quantile, interpolated linearly between order statistics (p50 = the median)."""
    values = sorted(v for v in values if not math.isnan(v))
    if not values:
        return math.nan
    pos = q * (len(values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def summarize(server: str, kind: str, c: int, n: int, results: list[Result], note: str = "") -> Row:
    good = [r for r in results if r.ok]
    errors = sorted({r.error for r in results if not r.ok})
    tokens = sum(r.tokens for r in good)
    wall = (max(r.end for r in results) - min(r.start for r in results)) if results else math.nan
    return Row(
        server=server,
        kind=kind,
        concurrency=c,
        requests=n,
        ok=len(good),
        tokens=tokens,
        wall_s=wall,
        tok_s=tokens / wall if good and wall > 0 else math.nan,
        ttft_p50=pct([r.ttft for r in good], 0.5),
        ttft_p90=pct([r.ttft for r in good], 0.9),
        itl_p50=pct([g for r in good for g in r.gaps], 0.5),
        itl_p90=pct([g for r in good for g in r.gaps], 0.9),
        tpot_p50=pct([r.tpot for r in good], 0.5),
        e2e_p50=pct([r.end - r.start for r in good], 0.5),
        tokens_per_request=tokens / len(good) if good else math.nan,
        prompt_tokens_per_request=(
            sum(r.prompt_tokens for r in good) / len(good) if good else math.nan
        ),
        errors=errors,
        note=note,
        results=results,
        load1=os.getloadavg()[0],
    )


def _s(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f} s"


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{1e3 * x:.0f} ms"


def _ratio(a: float, b: float) -> str:
    return "-" if math.isnan(a) or math.isnan(b) or b == 0 else f"{a / b:.2f}"


def table(rows: list[Row]) -> str:
    head = (
        "| server | prompt | conc | ok / sent | in tok/req | out tok/req | out tok/s | TTFT p50 "
        "| TTFT p90 | ITL p50 | ITL p90 | TPOT p50 | e2e p50 | load |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        status = f"{r.ok}/{r.requests}" if r.ok else f"**failed** 0/{r.requests}"
        if 0 < r.ok < r.requests:
            status = f"**{r.ok}/{r.requests}**"
        cells = [r.server, r.kind, str(r.concurrency), status]
        if r.ok:
            cells += [f"{r.prompt_tokens_per_request:.0f}", f"{r.tokens_per_request:.1f}"]
            cells += [f"{r.tok_s:.1f}"]
            cells += [_s(r.ttft_p50), _s(r.ttft_p90), _ms(r.itl_p50), _ms(r.itl_p90)]
            cells += [_ms(r.tpot_p50), _s(r.e2e_p50)]
        else:
            cells += ["failed"] * 9
        cells.append("-" if math.isnan(r.load1) else f"{r.load1:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def visible(text: str) -> str:
    """What both servers should agree on for the same tokens: the text without <|...|> special
    tokens (Prism skips every special token the tokenizer declares, mlx-vlm only
    `all_special_ids`), without <think> tags (mlx-vlm moves thinking to `reasoning`) and
    without non-ASCII characters (the detokenizers render invalid UTF-8, which random weights
    produce all the time, differently)."""
    text = re.sub(r"<\|[^<>|]*\|>|</?think>", "", text)
    return text.encode("ascii", "ignore").decode()


def ratio_table(rows: list[Row]) -> str:
    by = {(r.server, r.kind, r.concurrency): r for r in rows}
    lines = [
        "| prompt | conc | out tok/s (higher is better) | TTFT p50 | ITL p50 | TPOT p50 "
        "(lower is better) | same text |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.server != "prism" or ("mlx-vlm", r.kind, r.concurrency) not in by:
            continue
        p = by["mlx-vlm", r.kind, r.concurrency]
        if not r.ok or not p.ok:
            cells = ["prism failed" if not r.ok else "mlx-vlm failed"] * 4 + ["-"]
        else:
            cells = [_ratio(r.tok_s, p.tok_s), _ratio(r.ttft_p50, p.ttft_p50)]
            cells += [_ratio(r.itl_p50, p.itl_p50), _ratio(r.tpot_p50, p.tpot_p50)]
            theirs = {q.tag: visible(q.text) for q in p.results if q.ok}
            both = [q for q in r.results if q.ok and q.tag in theirs]
            same = sum(visible(q.text) == theirs[q.tag] for q in both)
            cells.append(f"{same}/{len(both)}")
        lines.append(f"| {r.kind} | {r.concurrency} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
