#!/usr/bin/env python3
"""The issue-18 table from `scripts/bench-side-by-side.sh` output.

Reads the JSON lines on stdin and prints one Markdown row per figure: the
median over rounds for each agent, and SPIRE's figure divided by Tessera's
(how many times better Tessera is; for throughput, the inverse).

    python3 scripts/side-by-side-table.py < side.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable

Row = dict[str, object]


def field(name: str, scale: float = 1.0) -> Callable[[Row], float | None]:
    def read(row: Row) -> float | None:
        value = row.get(name)
        return float(value) * scale if isinstance(value, (int, float)) else None

    return read


def registered_to_svid(row: Row) -> float | None:
    # Timing of the first SVID starts when the registration command exits;
    # Tessera's SIGHUP reload can deliver it before that, so both are added.
    register, first = field("register_p50_ms")(row), field("p50_ms")(row)
    return None if register is None or first is None else register + first


# (label, scenario, params that must match, how to read the figure, unit, lower is better)
Figure = tuple[str, str, dict[str, object], Callable[[Row], float | None], str, bool]
FIGURES: list[Figure] = [
    (
        "new workload, agent CPU per connection (x509-first, N = 1)",
        "x509-first",
        {"clients": 1},
        field("agent_cpu_us_per_op"),
        "µs",
        True,
    ),
    (
        "new workload, agent CPU per connection (N = 100)",
        "x509-first",
        {"clients": 100},
        field("agent_cpu_us_per_op"),
        "µs",
        True,
    ),
    ("x509-first p99, N = 1", "x509-first", {"clients": 1}, field("p99_ms"), "ms", True),
    ("x509-first throughput, N = 100", "x509-first", {"clients": 100}, field("ops_per_sec"), "/s", False),
    (
        "jwt-fetch cached, agent CPU per call (N = 100)",
        "jwt-fetch",
        {"clients": 100, "audiences": "cached"},
        field("agent_cpu_us_per_op"),
        "µs",
        True,
    ),
    (
        "jwt-fetch unique, agent CPU per call (N = 100)",
        "jwt-fetch",
        {"clients": 100, "audiences": "unique"},
        field("agent_cpu_us_per_op"),
        "µs",
        True,
    ),
    (
        "jwt-validate, agent CPU per call (N = 1)",
        "jwt-validate",
        {"clients": 1},
        field("agent_cpu_us_per_op"),
        "µs",
        True,
    ),
    ("jwt-validate p99, N = 1", "jwt-validate", {"clients": 1}, field("p99_ms"), "ms", True),
    (
        "memory per held X.509 stream (10,000 streams, fresh agent)",
        "idle-memory",
        {},
        field("rss_per_stream_bytes", 1 / 1024),
        "KiB",
        True,
    ),
    ("rotation pushed to 10,000 streams", "fanout", {}, field("all_updated_ms"), "ms", True),
    (
        "rotation: agent CPU per stream pushed",
        "fanout",
        {},
        field("agent_cpu_us_per_op"),
        "µs",
        True,
    ),
    ("agent RSS with no streams", "idle-memory", {}, field("baseline_rss_bytes", 1 / 1048576), "MiB", True),
    (
        "of which anonymous (heap, stacks: not the executable's pages)",
        "idle-memory",
        {},
        field("baseline_anon_bytes", 1 / 1048576),
        "MiB",
        True,
    ),
    ("new entry: registration command + first SVID (median)", "new-entry", {}, registered_to_svid, "ms", True),
]


def matches(row: Row, scenario: str, params: dict[str, object]) -> bool:
    if row.get("scenario") != scenario:
        return False
    got = row.get("params")
    if not isinstance(got, dict):
        return not params
    return all(got.get(k) == v for k, v in params.items())


def fmt(value: float, unit: str) -> str:
    if unit == "/s" or value >= 100:
        return f"{value:,.0f} {unit}"
    if value >= 10:
        return f"{value:.1f} {unit}"
    return f"{value:.2f} {unit}"


def main() -> None:
    rows: list[Row] = [json.loads(line) for line in sys.stdin if line.startswith("{")]
    agents = sorted({str(r.get("agent")) for r in rows}, key=lambda a: (a != "spire", a != "tessera-base", a))
    print("| figure | " + " | ".join(agents) + " | SPIRE ÷ Tessera |")
    print("|---|" + "---:|" * (len(agents) + 1))
    for label, scenario, params, read, unit, lower_better in FIGURES:
        medians: dict[str, float] = {}
        spread: dict[str, list[float]] = defaultdict(list)
        for agent in agents:
            values = [
                v
                for r in rows
                if r.get("agent") == agent and matches(r, scenario, params)
                if (v := read(r)) is not None
            ]
            if values:
                medians[agent] = statistics.median(values)
                spread[agent] = sorted(values)
        if not medians:
            continue
        cells = []
        for agent in agents:
            if agent in medians:
                lo, hi = spread[agent][0], spread[agent][-1]
                cells.append(f"{fmt(medians[agent], unit)} ({fmt(lo, '').strip()}–{fmt(hi, '').strip()})")
            else:
                cells.append("–")
        ratio = ""
        if "spire" in medians and medians.get("tessera"):
            r = medians["spire"] / medians["tessera"] if lower_better else medians["tessera"] / medians["spire"]
            ratio = f"**{r:.1f}x**"
        print(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    main()
