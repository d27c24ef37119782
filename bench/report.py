#!/usr/bin/env python3
"""Summarise a benchmark run: medians, ratios, targets, a table and a PNG chart.

    python bench/report.py bench/results/latest/results.json [--png chart.png]

``bench/run.py`` calls ``summarize``, ``format_table`` and ``plot`` at the
end of a run; this script redoes them from a saved ``results.json`` (for
example after changing the chart).

Every figure is a median over repetitions. Ratios are nbdcache / peer of
those medians: above 1.0 nbdcache is faster (for CPU seconds per GiB, lower is
better, so the table prints the CPU figures and no verdict).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

MiB, GiB = 1 << 20, 1 << 30

# Targets for nbdcache (the main server, volatile tier larger than the
# working set), as medians in one run on the benchmark machine.
TARGETS_VS_MEMORY = {  # job -> minimum nbdcache / nbdkit-memory
    "randread-4k": 1.0,
    "randwrite-4k": 1.0,
    "seqwrite-128k": 0.7,
    "seqread-128k": 0.8,
}
TARGET_VS_ZSTD = 1.0  # every job, nbdcache / nbdkit-zstd
TARGET_VS_ZSTD_WRITE = 2.0  # write jobs
TARGET_PAGESET_WRITE_VS_LZ4 = 0.7  # nbdcopy write of the real-file set / bare lz4 compress
TARGET_METADATA_BYTES_PER_PAGE = 16.0

MEMORY_PEER, ZSTD_PEER = "nbdkit-memory", "nbdkit-zstd"
COLORS = {
    "nbdcache": "#1f77b4",
    "nbdcache-wb": "#17becf",
    "nbdkit-memory": "#7f7f7f",
    "nbdkit-zstd": "#ff7f0e",
}
EXTRA_COLORS = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#d62728"]


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _stats(values: list[float]) -> dict[str, Any]:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def primary(run: dict[str, Any], job: dict[str, Any]) -> float:
    """The figure a job is judged by: IOPS for 4 KiB jobs, bytes/s otherwise."""
    return float(run["iops"] if job["unit"] == "iops" else run["bw_bytes"])


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    servers = results["meta"]["servers"]
    names = [s["name"] for s in servers]
    nbd = [s["name"] for s in servers if s["family"] == "nbdcache"]
    peers = [s["name"] for s in servers if s["family"] == "peer"]
    out: dict[str, Any] = {
        "jobs": {},
        "ratios": {},
        "memory": {},
        "pagesets": {},
        "targets": [],
        "pairs": [[a, b] for a in nbd for b in peers],
    }

    for job in results["jobs"]:
        per: dict[str, Any] = {}
        for name in names:
            runs = [r for r in results["runs"] if r["job"] == job["name"] and r["server"] == name]
            if not runs:
                continue
            st = _stats([primary(r, job) for r in runs])
            st["cpu_s_per_gib"] = _median([r["cpu_s_per_gib"] for r in runs])
            st["p99_us"] = _median(
                [max(r.get("read_clat_p99_us", 0), r.get("write_clat_p99_us", 0)) for r in runs]
            )
            per[name] = st
        if per:
            out["jobs"][job["name"]] = per
            out["ratios"][job["name"]] = {
                f"{a}/{b}": _ratio(per.get(a, {}).get("median"), per.get(b, {}).get("median"))
                for a, b in out["pairs"]
            }

    for name in names:
        mems = [m for m in results["memory"] if m["server"] == name]
        if not mems:
            continue
        entry: dict[str, Any] = {
            k: _median([m.get(k) for m in mems]) for k in ("vmhwm", "vmrss", "threads")
        }
        bds = [m["breakdown"] for m in mems if m.get("breakdown")]
        if bds:
            entry["breakdown"] = {
                k: _median([b.get(k) for b in bds]) for k in ("arena", "pagetable", "rest")
            }
        entry["exit_codes"] = sorted({m.get("exit_code") for m in mems}, key=str)
        out["memory"][name] = entry

    for set_name, lz4 in (results.get("lz4") or {}).items():
        per = {}
        for name in names:
            runs = [p for p in results["pagesets"] if p["set"] == set_name and p["server"] == name]
            if not runs:
                continue
            w = _median([p["write_bps"] for p in runs])
            r = _median([p["read_bps"] for p in runs])
            per[name] = {
                "write_bps": w,
                "read_bps": r,
                "randread_iops": _median([p["randread_4k"]["iops"] for p in runs]),
                "rss_delta": _median([p["rss_delta"] for p in runs]),
                "write_cpu_s_per_gib": _median([p["write_cpu_s_per_gib"] for p in runs]),
                "verified": all(p["verified"] for p in runs),
                "write_vs_lz4_compress": _ratio(w, lz4["compress_bps"]),
                "read_vs_lz4_decompress": _ratio(r, lz4["decompress_bps"]),
            }
        out["pagesets"][set_name] = {"lz4": lz4, "servers": per}

    jobs = {j["name"]: j for j in results["jobs"]}
    for s in servers:
        if not s.get("targets"):
            continue
        me = s["name"]
        for jname, per in out["jobs"].items():
            job = jobs[jname]
            if not job.get("targeted", True) or me not in per:
                continue
            checks = []
            if jname in TARGETS_VS_MEMORY and MEMORY_PEER in per:
                checks.append((MEMORY_PEER, TARGETS_VS_MEMORY[jname]))
            if ZSTD_PEER in per:
                checks.append(
                    (ZSTD_PEER, TARGET_VS_ZSTD_WRITE if job["kind"] == "write" else TARGET_VS_ZSTD)
                )
            for peer, target in checks:
                ratio = _ratio(per[me]["median"], per[peer]["median"])
                out["targets"].append(
                    {
                        "what": f"{jname}: {me} / {peer}",
                        "value": ratio,
                        "target": target,
                        "ok": ratio is not None and ratio >= target,
                    }
                )
        ps = out["pagesets"].get("real-files", {}).get("servers", {}).get(me)
        if ps:
            v = ps["write_vs_lz4_compress"]
            out["targets"].append(
                {
                    "what": f"real-files nbdcopy write: {me} / bare lz4 compress",
                    "value": v,
                    "target": TARGET_PAGESET_WRITE_VS_LZ4,
                    "ok": v is not None and v >= TARGET_PAGESET_WRITE_VS_LZ4,
                }
            )
        # Only the server's own page-table figure counts: RSS right after start shows
        # the eagerly allocated part and misses metadata that grows with writes.
        md = results.get("metadata") or {}
        per_page = md.get("pagetable_bytes_per_page")
        if me == "nbdcache" and per_page is not None:
            out["targets"].append(
                {
                    "what": "metadata bytes per device page at 64 GiB",
                    "value": per_page,
                    "target": TARGET_METADATA_BYTES_PER_PAGE,
                    "ok": per_page <= TARGET_METADATA_BYTES_PER_PAGE,
                    "lower_is_better": True,
                }
            )
    return out


# --------------------------------------------------------------------------- table


def _fmt_rate(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    return f"{v / 1000:.1f}k" if unit == "iops" else f"{v / MiB:.0f}"


def _fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _fmt_mib(v: float | None) -> str:
    return "-" if v is None else f"{v / MiB:.0f}"


def _short(name: str) -> str:
    return name.replace("nbdkit-", "").replace("nbdcache", "nbdc")


def _grid(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w)
        for i, (c, w) in enumerate(zip(r, widths, strict=True))
    )
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def format_table(results: dict[str, Any], summary: dict[str, Any]) -> str:
    meta = results["meta"]
    names = [s["name"] for s in meta["servers"]]
    pairs = summary["pairs"]
    jobs = {j["name"]: j for j in results["jobs"]}
    parts = [
        f"nbdcache benchmark  {meta.get('started', '')}  tree {meta.get('tree', '?')}  "
        f"{meta.get('cpus')} CPUs",
        f"{meta['reps']} reps x {meta['runtime_s']} s per job, area "
        f"{meta['area_bytes'] / MiB:.0f} MiB; medians; 4 KiB jobs in IOPS, others in MiB/s; "
        "ratios are nbdcache / peer (higher is better)",
    ]
    for s in meta["servers"]:
        info = meta.get("server_info", {}).get(s["name"], {})
        mc = {True: ", multi-conn", False: ", no multi-conn"}.get(info.get("can_multi_conn"), "")
        parts.append(f"  {s['name']:16} {s['describe']}{mc}")

    header = ["job", "conns", *names, *(f"{_short(a)}/{_short(b)}" for a, b in pairs)]
    rows = []
    for jname, per in summary["jobs"].items():
        job = jobs[jname]
        row = [jname, str(job["conns"])]
        row += [_fmt_rate(per.get(n, {}).get("median"), job["unit"]) for n in names]
        row += [_fmt_ratio(summary["ratios"][jname].get(f"{a}/{b}")) for a, b in pairs]
        rows.append(row)
    if rows:
        parts += ["", "Throughput", _grid(header, rows)]

        rows = []
        for jname, per in summary["jobs"].items():
            row = [jname]
            for n in names:
                c = per.get(n, {}).get("cpu_s_per_gib")
                row.append("-" if c is None else f"{c:.2f}")
            for n in names:
                p = per.get(n, {}).get("p99_us")
                row.append("-" if p is None else f"{p:.0f}")
            rows.append(row)
        parts += [
            "",
            "Server CPU seconds per GiB moved (lower is better) | p99 completion latency, us",
            _grid(
                ["job", *(f"cpu {_short(n)}" for n in names), *(f"p99 {_short(n)}" for n in names)],
                rows,
            ),
        ]

    if summary["memory"]:
        rows = []
        for n, m in summary["memory"].items():
            bd = m.get("breakdown") or {}
            rows.append(
                [
                    n,
                    _fmt_mib(m["vmhwm"]),
                    _fmt_mib(m["vmrss"]),
                    _fmt_mib(bd.get("arena")),
                    _fmt_mib(bd.get("pagetable")),
                    _fmt_mib(bd.get("rest")),
                    ",".join(str(c) for c in m.get("exit_codes", [])),
                ]
            )
        parts += [
            "",
            "Memory at the end of the main phase, MiB (arena / page table / rest "
            "when nbdcache exposes them)",
            _grid(["server", "peak RSS", "RSS", "arena", "page table", "rest", "exit"], rows),
        ]

    for set_name, ps in summary["pagesets"].items():
        lz4 = ps["lz4"]
        rows = [
            [
                "bare lz4 (in process)",
                f"{lz4['compress_bps'] / MiB:.0f}",
                f"{lz4['decompress_bps'] / MiB:.0f}",
                "-",
                _fmt_mib(lz4["ratio"] * lz4["pages"] * 4096),
                "-",
                "-",
                "-",
            ]
        ]
        for n, v in ps["servers"].items():
            rows.append(
                [
                    n,
                    _fmt_mib(v["write_bps"]),
                    _fmt_mib(v["read_bps"]),
                    _fmt_rate(v["randread_iops"], "iops"),
                    _fmt_mib(v["rss_delta"]),
                    _fmt_ratio(v["write_vs_lz4_compress"]),
                    _fmt_ratio(v["read_vs_lz4_decompress"]),
                    "ok" if v["verified"] else "MISMATCH",
                ]
            )
        parts += [
            "",
            f"Page set {set_name}: {lz4['pages']} pages ({lz4['zero_pages']} zero, "
            f"{lz4['incompressible_pages']} over 7/8 after lz4, lz4 output "
            f"{lz4['ratio'] * 100:.0f}% of the input); nbdcopy MiB/s, fio 4 KiB "
            "random read IOPS, RSS growth from the write (MiB; for lz4: output size)",
            _grid(
                [
                    "server",
                    "write",
                    "read",
                    "randread",
                    "+RSS",
                    "write/lz4c",
                    "read/lz4d",
                    "content",
                ],
                rows,
            ),
        ]

    md = results.get("metadata")
    if md:
        sizes = md.get("sizes", {})
        line = ", ".join(f"{k}: RSS {_fmt_mib(v.get('vmrss'))} MiB" for k, v in sizes.items())
        extra = []
        if md.get("rss_bytes_per_page") is not None:
            extra.append(f"RSS growth {md['rss_bytes_per_page']:.2f} B/page")
        if md.get("pagetable_bytes_per_page") is not None:
            extra.append(f"page-table metric {md['pagetable_bytes_per_page']:.2f} B/page")
        parts += ["", f"Metadata (nbdcache just started) {line}; {'; '.join(extra) or 'n/a'}"]
        if md.get("pagetable_bytes_per_page") is None:
            parts.append(
                "  (no page-table metric exposed: RSS growth shows only what is "
                "allocated up front, so the metadata target is not judged)"
            )

    if summary["targets"]:
        rows = []
        for t in summary["targets"]:
            cmp = "<=" if t.get("lower_is_better") else ">="
            val = (
                "-"
                if t["value"] is None
                else (f"{t['value']:.2f}" if t.get("lower_is_better") else f"{t['value']:.2f}x")
            )
            rows.append([t["what"], val, f"{cmp} {t['target']}", "ok" if t["ok"] else "MISS"])
        met = sum(t["ok"] for t in summary["targets"])
        parts += [
            "",
            f"Targets: {met}/{len(summary['targets'])} met",
            _grid(["check", "value", "target", ""], rows),
        ]
    if results.get("errors"):
        parts += ["", "Errors:", *(f"  {e}" for e in results["errors"])]
    return "\n".join(parts)


# --------------------------------------------------------------------------- chart


def _colors(names: list[str]) -> dict[str, str]:
    out, extra = {}, iter(EXTRA_COLORS)
    for n in names:
        out[n] = COLORS.get(n) or next(extra, "#333333")
    return out


def _bars(
    ax: Any,
    groups: list[str],
    names: list[str],
    colors: dict[str, str],
    value: Any,
    err: Any = None,
    label_fmt: Any = None,
    fontsize: int = 7,
) -> None:
    """Grouped bars: one group per entry of groups, one bar per server with data."""
    names = [n for n in names if any(value(g, n) is not None for g in groups)]
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for g, grp in enumerate(groups):
            v = value(grp, n)
            if v is None:
                continue
            xs.append(g - 0.4 + width * (i + 0.5))
            ys.append(v)
            e = err(grp, n) if err else None
            lo.append(v - e[0] if e else 0)
            hi.append(e[1] - v if e else 0)
        if not xs:
            continue
        bars = ax.bar(
            xs,
            ys,
            width * 0.92,
            label=n,
            color=colors[n],
            yerr=[lo, hi] if err else None,
            capsize=2,
            error_kw={"elinewidth": 0.8, "ecolor": "#333333"},
        )
        if label_fmt:
            for b, y, up in zip(bars, ys, hi, strict=True):
                ax.annotate(
                    label_fmt(y),
                    (b.get_x() + b.get_width() / 2, y + up),
                    ha="center",
                    va="bottom",
                    fontsize=fontsize,
                    rotation=90,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.margins(y=0.18)


def plot(results: dict[str, Any], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = results["meta"]
    names = [s["name"] for s in meta["servers"]]
    colors = _colors(names)
    jobs = {j["name"]: j for j in results["jobs"]}
    sj = summary["jobs"]
    job_names = list(sj)
    iops_jobs = [j for j in job_names if jobs[j]["unit"] == "iops"]
    bw_jobs = [j for j in job_names if jobs[j]["unit"] != "iops"]
    has_mem, has_ps = bool(summary["memory"]), bool(summary["pagesets"])

    fig = plt.figure(figsize=(16, 17), layout="constrained")
    gs = fig.add_gridspec(4, 2, height_ratios=[1.15, 1, 1, 1])
    fig.suptitle(
        f"nbdcache vs peers: {meta['reps']} reps x {meta['runtime_s']} s, area "
        f"{meta['area_bytes'] / MiB:.0f} MiB, {meta.get('cpus')} CPUs, "
        f"{meta.get('started', '')}, tree {meta.get('tree', '?')} (medians; whiskers min-max)",
        fontsize=12,
    )

    def med(j: str, n: str) -> float | None:
        return sj[j].get(n, {}).get("median")

    def spread(scale: float) -> Any:
        def f(j: str, n: str) -> tuple[float, float] | None:
            s = sj[j].get(n)
            return (s["min"] / scale, s["max"] / scale) if s and s["n"] > 1 else None

        return f

    # 1. throughput relative to nbdkit memory, every job
    ax = fig.add_subplot(gs[0, :])
    ref = MEMORY_PEER if MEMORY_PEER in names else names[-1]

    def rel(j: str, n: str) -> float | None:
        m, r = med(j, n), med(j, ref)
        return m / r if m is not None and r else None

    _bars(ax, job_names, names, colors, rel, label_fmt=lambda v: f"{v:.2f}", fontsize=7)
    ax.axhline(1.0, color="black", lw=0.8)
    for g, j in enumerate(job_names):
        if j in TARGETS_VS_MEMORY and ref == MEMORY_PEER:
            ax.plot(
                [g - 0.42, g + 0.42],
                [TARGETS_VS_MEMORY[j]] * 2,
                color="#d62728",
                lw=1.5,
                ls="--",
                label="target vs memory" if g == 0 else None,
            )
    ax.set_ylabel(f"throughput / {ref}")
    ax.set_title(
        f"Throughput relative to {ref} (higher is better; dashed red: target)", fontsize=10
    )
    ax.legend(ncol=len(names) + 1, fontsize=8, loc="upper left")

    # 2. absolute 4 KiB IOPS
    ax = fig.add_subplot(gs[1, 0])
    _bars(
        ax,
        iops_jobs,
        names,
        colors,
        lambda j, n: None if med(j, n) is None else med(j, n) / 1000,
        spread(1000),
        label_fmt=lambda v: f"{v:.0f}k",
    )
    ax.set_ylabel("kIOPS")
    ax.set_title("4 KiB jobs, iodepth 32 per connection (-Nc: N connections)", fontsize=10)

    # 3. absolute MiB/s
    ax = fig.add_subplot(gs[1, 1])
    _bars(
        ax,
        bw_jobs,
        names,
        colors,
        lambda j, n: None if med(j, n) is None else med(j, n) / MiB,
        spread(MiB),
        label_fmt=lambda v: f"{v:.0f}",
    )
    ax.set_ylabel("MiB/s")
    ax.set_title("Large-block jobs (fill: 1 MiB, iodepth 8; 128 KiB, iodepth 8)", fontsize=10)

    # 4. CPU per GiB
    ax = fig.add_subplot(gs[2, 0])
    _bars(
        ax,
        job_names,
        names,
        colors,
        lambda j, n: sj[j].get(n, {}).get("cpu_s_per_gib"),
        label_fmt=lambda v: f"{v:.1f}",
        fontsize=6,
    )
    ax.set_ylabel("server CPU s / GiB")
    ax.set_title("Server CPU seconds per GiB moved (lower is better)", fontsize=10)

    # 5. page sets: nbdcopy vs bare lz4
    ax = fig.add_subplot(gs[2, 1])
    if has_ps:
        groups, vals = [], {}
        for set_name, ps in summary["pagesets"].items():
            for op, key, lz4key in (
                ("write", "write_bps", "compress_bps"),
                ("read", "read_bps", "decompress_bps"),
            ):
                g = f"{set_name}\n{op}"
                groups.append(g)
                vals[(g, "bare lz4")] = ps["lz4"][lz4key] / MiB
                for n, v in ps["servers"].items():
                    vals[(g, n)] = v[key] / MiB if v[key] else None
        ps_names = [n for n in names if any((g, n) in vals for g in groups)] + ["bare lz4"]
        ps_colors = {**colors, "bare lz4": "#d9d9d9"}
        _bars(
            ax,
            groups,
            ps_names,
            ps_colors,
            lambda g, n: vals.get((g, n)),
            label_fmt=lambda v: f"{v:.0f}",
        )
        ax.set_ylabel("MiB/s")
        ax.set_xticklabels(groups, rotation=0, ha="center", fontsize=8)
        ax.legend(fontsize=7, loc="upper left")
        ax.set_title("Page sets through nbdcopy vs bare lz4 compress/decompress", fontsize=10)
    else:
        ax.text(
            0.5,
            0.5,
            "page sets not run (bench/pagemix.py missing or skipped)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.set_axis_off()

    # 6. peak RSS, with nbdcache's breakdown
    ax = fig.add_subplot(gs[3, 0])
    if has_mem:
        mem_names = [n for n in names if n in summary["memory"]]
        plain = [n for n in mem_names if not summary["memory"][n].get("breakdown")]
        for i, n in enumerate(mem_names):
            m = summary["memory"][n]
            bd = m.get("breakdown")
            ax.bar(
                i - 0.2,
                (m["vmhwm"] or 0) / MiB,
                0.38,
                color=colors[n],
                label="peak RSS (VmHWM)" if i == 0 else None,
            )
            ax.annotate(
                f"{(m['vmhwm'] or 0) / MiB:.0f}",
                (i - 0.2, (m["vmhwm"] or 0) / MiB),
                ha="center",
                va="bottom",
                fontsize=7,
            )
            if bd:
                bottom = 0.0
                for part, hatch in (("arena", "//"), ("pagetable", "xx"), ("rest", "..")):
                    v = (bd.get(part) or 0) / MiB
                    ax.bar(
                        i + 0.2,
                        v,
                        0.38,
                        bottom=bottom,
                        color="white",
                        edgecolor=colors[n],
                        hatch=hatch,
                        label=f"RSS: {part}",
                    )
                    if v:
                        ax.annotate(
                            f"{part} {v:.0f}",
                            (i + 0.4, bottom + v / 2),
                            ha="left",
                            va="center",
                            fontsize=7,
                            xytext=(2, 0),
                            textcoords="offset points",
                        )
                    bottom += v
            else:
                ax.bar(
                    i + 0.2,
                    (m["vmrss"] or 0) / MiB,
                    0.38,
                    color=colors[n],
                    alpha=0.45,
                    label="RSS at end" if plain and n == plain[0] else None,
                )
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles, strict=True))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
        ax.set_xticks(range(len(mem_names)))
        ax.set_xticklabels(mem_names, fontsize=8)
        ax.set_ylabel("MiB")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.set_title(
            f"Server memory after the main phase ({meta['area_bytes'] / MiB:.0f} MiB "
            "written, 60% compressible)",
            fontsize=10,
        )
    else:
        ax.set_axis_off()

    # 7. RSS growth when writing the page sets
    ax = fig.add_subplot(gs[3, 1])
    if has_ps:
        sets = list(summary["pagesets"])
        _bars(
            ax,
            sets,
            names,
            colors,
            lambda s, n: (
                v["rss_delta"] / MiB if (v := summary["pagesets"][s]["servers"].get(n)) else None
            ),
            label_fmt=lambda v: f"{v:.0f}",
        )
        sizes = {s: summary["pagesets"][s]["lz4"]["pages"] * 4096 / MiB for s in sets}
        for g, s in enumerate(sets):
            ax.plot(
                [g - 0.42, g + 0.42],
                [sizes[s]] * 2,
                color="black",
                lw=1,
                ls=":",
                label="data written" if g == 0 else None,
            )
            ax.plot(
                [g - 0.42, g + 0.42],
                [sizes[s] * summary["pagesets"][s]["lz4"]["ratio"]] * 2,
                color="#d62728",
                lw=1,
                ls="--",
                label="lz4 output size" if g == 0 else None,
            )
        ax.set_xticklabels(sets, rotation=0, ha="center", fontsize=8)
        ax.set_ylabel("MiB")
        ax.legend(fontsize=7)
        ax.set_title("RSS growth from writing each page set (lower is better)", fontsize=10)
    else:
        ax.set_axis_off()

    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="results.json written by bench/run.py")
    p.add_argument("--png", type=Path, help="chart path (default: chart.png next to it)")
    args = p.parse_args(argv)
    results = json.loads(args.results.read_text())
    summary = summarize(results)
    print(format_table(results, summary))
    png = args.png or args.results.with_name("chart.png")
    plot(results, summary, png)
    print(f"\nchart: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
