"""Where Prism's time to first token goes: the gateway's per-request phase histograms
(`prism:request_{media,encode,queue,prefill}_time_seconds`), read from /metrics before and
after a level; the difference of sums over the difference of counts is the level's mean."""

from __future__ import annotations

import math
import re

import httpx

PHASES = ("media", "encode", "queue", "prefill")
_LINE = re.compile(r"^prism:request_(\w+)_time_seconds_(sum|count)\{[^}]*\} (\S+)$")


def scrape(url: str) -> dict[str, float]:
    """{"encode_sum": s, "encode_count": n, ...} summed over models; {} when unreachable."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if m := _LINE.match(line):
            key = f"{m[1]}_{m[2]}"
            out[key] = out.get(key, 0.0) + float(m[3])
    return out


def means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean seconds per request of each phase over the level (NaN: none observed)."""
    result = {}
    for phase in PHASES:
        n = after.get(f"{phase}_count", 0.0) - before.get(f"{phase}_count", 0.0)
        s = after.get(f"{phase}_sum", 0.0) - before.get(f"{phase}_sum", 0.0)
        result[phase] = s / n if n > 0 else math.nan
    return result


def table(rows: list) -> str:
    """Prism rows' TTFT beside the mean of each phase (and its share of the mean TTFT)."""
    head = "| prompt | conc | TTFT p50 | TTFT mean | " + " | ".join(PHASES) + " |"
    lines = [head, "|" + "---|" * (4 + len(PHASES))]
    for r in rows:
        if r.server != "prism" or not r.phases or not r.ok:
            continue
        ttfts = [q.ttft for q in r.results if q.ok]
        mean = sum(ttfts) / len(ttfts)
        cells = [r.kind, str(r.concurrency), f"{r.ttft_p50:.2f} s", f"{mean:.2f} s"]
        for phase in PHASES:
            v = r.phases.get(phase, math.nan)
            cells.append("-" if math.isnan(v) else f"{v:.3f} s ({100 * v / mean:.0f}%)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
