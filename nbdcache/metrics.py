"""Counters for operators: Prometheus exposition and `nbdcache stats`.

The stores and the server keep plain int counters; nothing here runs per
request.  A prometheus-client custom collector reads them when scraped, and
a tiny HTTP endpoint on the event loop (`--metrics HOST:PORT`) serves them,
so a scrape never races the loop that updates them.  `nbdcache stats`
fetches that page and prints it as a table.

Names follow what they count, in the spirit of zram's `mm_stat` and
zcache's debugfs: a key ending in `_total` is a counter, anything else a
gauge; every sample carries the export's name as a label.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "nbdcache_"
#: Per export: its name -> a function returning its counters.
Sources = Mapping[str, Callable[[], Mapping[str, int]]]


class StatsCollector:
    """Exposes every export's counters, labelled by export."""

    def __init__(self, sources: Sources, server: Callable[[], Mapping[str, int]]) -> None:
        self.sources = sources
        self.server = server

    def collect(self) -> Iterator[Metric]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for export, stats in self.sources.items():
            for key, value in stats().items():
                fam = families.get(key)
                if fam is None:
                    fam = _family(key, ["export"])
                    families[key] = fam
                fam.add_metric([export], value)
        for key, value in self.server().items():
            fam = _family(key, [])
            fam.add_metric([], value)
            families["server " + key] = fam
        yield from families.values()


def _family(key: str, labels: list[str]) -> GaugeMetricFamily | CounterMetricFamily:
    if key.endswith("_total"):
        name = PREFIX + key.removesuffix("_total")
        return CounterMetricFamily(name, key.replace("_", " "), labels=labels)
    return GaugeMetricFamily(PREFIX + key, key.replace("_", " "), labels=labels)


def exposition(collector: StatsCollector) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return bytes(generate_latest(registry))


async def serve_metrics(collector: StatsCollector, host: str, port: int) -> asyncio.Server:
    """Answer every HTTP GET with the exposition (one request per connection)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            ok = request.startswith(b"GET ")
            body = exposition(collector) if ok else b"only GET is served\n"
            status = b"200 OK" if ok else b"405 Method Not Allowed"
            writer.write(
                b"HTTP/1.0 " + status + b"\r\nContent-Type: text/plain; version=0.0.4\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)


def fetch(url: str) -> dict[str, dict[str, float]]:
    """Scrape `url` -> {export or "server": {counter: value}}."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    table: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith(PREFIX) or sample.name.endswith("_created"):
                continue
            export = sample.labels.get("export", "server")
            key = sample.name.removeprefix(PREFIX)
            table.setdefault(export, {})[key] = sample.value
    return table


def _human(key: str, value: float) -> str:
    if "bytes" in key and value >= 1024:
        for unit in ("KiB", "MiB", "GiB", "TiB"):
            value /= 1024
            if value < 1024:
                return f"{value:.1f} {unit}"
    if "ratio" in key:
        return f"{value:.2f}"
    return f"{int(value)}" if float(value).is_integer() else f"{value:.3f}"


def format_table(table: Mapping[str, Mapping[str, Any]]) -> str:
    """One column per export, one row per counter."""
    columns = sorted(table, key=lambda c: (c == "server", c))
    keys = sorted({k for c in columns for k in table[c]})
    header = ["counter", *[c or "(default)" for c in columns]]
    rows = [header]
    for key in keys:
        rows.append(
            [key, *[_human(key, table[c][key]) if key in table[c] else "" for c in columns]]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            v.rjust(w) for v, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
