"""Charts of a sweep's CSV: swap throughput and hog run time, one line per server kind.

One PNG per varied parameter (servers, delay, tier), each with two panels
(throughput, run time); repeated runs of a point are drawn as their mean
with a bar from the lowest to the highest. For each chart the other parameters are held at
the value most runs share with the first point (the axes plan's base), so
every line is one server kind varying one thing.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

AXES = {
    "servers": ("servers", "memory servers (striped)"),
    "delay": ("delay_ms", "injected delay per request (ms)"),
    "tier": ("tier", "nbdcache RAM tier per server"),
}
OTHERS = {
    "servers": ("delay_ms", "tier"),
    "delay": ("servers", "tier"),
    "tier": ("servers", "delay_ms"),
}


def _size_mib(text: str) -> float:
    text = text.strip().upper()
    units = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}
    return float(text[:-1]) * units[text[-1]] if text[-1:] in units else float("nan")


def load(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("status") == "ok" and r.get("hog_s")]


def _base(rows: list[dict[str, str]], fixed: tuple[str, ...]) -> dict[str, str]:
    """The most common values of the fixed columns among nbdcache rows (else all)."""
    pool = [r for r in rows if r["kind"] == "nbdcache"] or rows
    counts: dict[tuple[str, ...], int] = defaultdict(int)
    for r in pool:
        counts[tuple(r[c] for c in fixed)] += 1
    best = max(counts, key=lambda k: counts[k])
    return dict(zip(fixed, best, strict=True))


def plot(csv_path: Path, outdir: Path, note: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load(csv_path)
    written: list[Path] = []
    if not rows:
        return written
    for axis, (column, label) in AXES.items():
        fixed = OTHERS[axis]
        base = _base(rows, fixed)
        lines: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
        for r in rows:
            if axis != "tier" and r["kind"] == "nbdkit":
                keep = all(r[c] == base[c] for c in fixed if c != "tier")
            else:
                keep = all(r[c] == base[c] for c in fixed)
            if axis == "tier" and r["kind"] != "nbdcache":
                keep = False
            if not keep:
                continue
            x = _size_mib(r[column]) if axis == "tier" else float(r[column])
            lines[r["kind"]].append((x, float(r["swap_mib_s"]), float(r["hog_s"])))
        if not any(len({p[0] for p in points}) > 1 for points in lines.values()):
            continue
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 6.4), sharex=True)
        for kind, points in sorted(lines.items()):
            # Repeated runs of one point: the mean, and a bar from min to max.
            by_x: dict[float, list[tuple[float, float]]] = defaultdict(list)
            for x, rate, secs in points:
                by_x[x].append((rate, secs))
            xs = sorted(by_x)
            name = "nbdkit memory" if kind == "nbdkit" else kind
            for axes, i in ((top, 0), (bottom, 1)):
                values = [[v[i] for v in by_x[x]] for x in xs]
                means = [sum(v) / len(v) for v in values]
                spread = [
                    [m - min(v) for m, v in zip(means, values, strict=True)],
                    [max(v) - m for m, v in zip(means, values, strict=True)],
                ]
                axes.errorbar(xs, means, yerr=spread, marker="o", capsize=3, label=name)
        bottom.set_xticks(sorted({p[0] for points in lines.values() for p in points}))
        top.set_ylabel("swap in+out (MiB/s)")
        bottom.set_ylabel("hog run time (s)")
        bottom.set_xlabel(label + (" (MiB)" if axis == "tier" else ""))
        top.set_ylim(bottom=0)
        bottom.set_ylim(bottom=0)
        held = ", ".join(
            f"{'nbdcache tier' if c == 'tier' else c.replace('_ms', ' (ms)')}={base[c]}"
            for c in fixed
        )
        top.set_title(f"swap on remote memory vs {axis} ({held})", fontsize=10)
        top.legend()
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
        if note:
            fig.text(0.01, 0.005, note, fontsize=7, color="0.35")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        out = outdir / f"{csv_path.stem}-{axis}.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    return written
