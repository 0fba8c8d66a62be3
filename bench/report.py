"""Turn raw wrk runs into medians, a markdown table, results.json and a chart.

Only successful runs enter the medians. Ratios are computed between medians
measured in the same interleaved session: `× nginx` is a target's median req/s
over nginx's at the same connection count (a `*-workers` target's over
nginx-workers': the same number of processes); `max ms` is the slowest request of
any clean run (wrk's Max); `× turnout` and `p99 × turnout`
are a `turnout-*` variant's median req/s and median p99 over plain Turnout's
(the cost of a feature); `added p50` (at c=1 only, where latency is not
queueing) is a target's median p50 minus the direct upstream's.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from bench.wrk import WrkRun


@dataclass
class Row:
    target: str
    connections: int
    ok_runs: int
    total_runs: int
    rps: float | None = None
    rps_min: float | None = None
    rps_max: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None  # the slowest request of any clean run
    x_nginx: float | None = None
    x_stock: float | None = None  # against NGINX with its stock proxy settings
    x_turnout: float | None = None  # against plain Turnout (the cost of a feature)
    p99_x_turnout: float | None = None  # p99 against plain Turnout's
    added_p50_ms: float | None = None
    user_us: float | None = None  # median user CPU µs per request of the target's processes
    sys_us: float | None = None


def summarize(runs: list[WrkRun], targets: list[str], connections: list[int]) -> list[Row]:
    rows: dict[tuple[str, int], Row] = {}
    for c in connections:
        for name in targets:
            mine = [r for r in runs if r.target == name and r.connections == c]
            good = [r for r in mine if r.ok]
            row = Row(name, c, len(good), len(mine))
            if good:
                rps = [r.rps for r in good if r.rps is not None]
                row.rps = statistics.median(rps)
                row.rps_min, row.rps_max = min(rps), max(rps)
                row.p50_ms = statistics.median(r.p50_ms for r in good if r.p50_ms is not None)
                row.p99_ms = statistics.median(r.p99_ms for r in good if r.p99_ms is not None)
                row.max_ms = max((r.max_ms for r in good if r.max_ms is not None), default=None)
                users = [r.user_us for r in good if r.user_us is not None]
                kernel = [r.sys_us for r in good if r.sys_us is not None]
                row.user_us = statistics.median(users) if users else None
                row.sys_us = statistics.median(kernel) if kernel else None
            rows[name, c] = row
    for (name, c), row in rows.items():
        ref = "nginx-workers" if name.endswith("-workers") else "nginx"
        nginx, direct = rows.get((ref, c)), rows.get(("direct", c))
        stock, plain = rows.get(("nginx-stock", c)), rows.get(("turnout", c))
        if row.rps is not None and nginx is not None and nginx.rps:
            row.x_nginx = row.rps / nginx.rps
        single = not name.endswith("-workers")  # the other ratios compare single processes
        if single and row.rps is not None and stock is not None and stock.rps:
            row.x_stock = row.rps / stock.rps
        variant = single and name.startswith("turnout-")
        if row.rps is not None and variant and plain and plain.rps:
            row.x_turnout = row.rps / plain.rps
        if row.p99_ms is not None and variant and plain and plain.p99_ms:
            row.p99_x_turnout = row.p99_ms / plain.p99_ms
        measured = direct is not None and direct.p50_ms is not None and row.p50_ms is not None
        if c == 1 and name != "direct" and measured:
            row.added_p50_ms = row.p50_ms - direct.p50_ms  # type: ignore[operator,union-attr]
    return list(rows.values())


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _cpu(r: Row) -> str:
    if r.user_us is None or r.sys_us is None:
        return "—"
    return f"{r.user_us:.1f} + {r.sys_us:.1f}"


def markdown(rows: list[Row], meta: dict[str, object], notes: list[str]) -> str:
    head = (
        f"## Turnout benchmark — {meta['cpu_count']} cores (os.cpu_count()), "
        f"wrk -t{meta['threads']}, {meta['rounds']} interleaved round(s) × {meta['duration_s']:g} s"
    )
    same = " (the same on both versions)" if meta.get("same_body") else ""
    slow = meta.get("slow_canary_s")
    scenario = f" · slow canary: green answers after {slow:g} s" if slow else ""
    lines = [
        head,
        "",
        f"{meta['started_at']} · upstream: {meta['upstream']}, {meta['body_bytes']}-byte body"
        f"{same} · {meta['users']} user ids, canary weight {meta['weight']}%{scenario} · "
        f"{meta['platform']}",
        "",
        "| target | conns | req/s (median) | req/s min–max | p50 ms | p99 ms | max ms | × nginx "
        "| × nginx-stock | × turnout | p99 × turnout | added p50 vs direct (ms) "
        "| CPU µs/req user + kernel | ok runs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        spread = "—" if r.rps_min is None else f"{r.rps_min:,.0f}–{r.rps_max:,.0f}"
        lines.append(
            f"| {r.target} | {r.connections} | {_num(r.rps, ',.0f')} | {spread} "
            f"| {_num(r.p50_ms, '.3f')} | {_num(r.p99_ms, '.3f')} | {_num(r.max_ms, '.2f')} "
            f"| {_num(r.x_nginx, '.2f')} "
            f"| {_num(r.x_stock, '.2f')} | {_num(r.x_turnout, '.3f')} "
            f"| {_num(r.p99_x_turnout, '.3f')} "
            f"| {_num(r.added_p50_ms, '+.3f')} | {_cpu(r)} | {r.ok_runs}/{r.total_runs} |"
        )
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def write_json(path: Path, meta: dict[str, object], rows: list[Row], runs: list[WrkRun]) -> None:
    doc = {
        "meta": meta,
        "summary": [vars(r) for r in rows],
        "runs": [r.as_dict() for r in runs],
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")


def chart(path: Path, rows: list[Row], meta: dict[str, object]) -> str | None:
    """Grouped bars: one panel per connection count, one bar per target, min..max
    error bars. Returns a reason if no chart could be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed; no chart"
    conns = sorted({r.connections for r in rows}, reverse=True)
    targets = list(dict.fromkeys(r.target for r in rows))
    colors = {t: f"C{i}" for i, t in enumerate(targets)}
    fig, axes = plt.subplots(1, len(conns), figsize=(4.2 * len(conns) + 1, 4.6), squeeze=False)
    for ax, c in zip(axes[0], conns, strict=True):
        mine = [r for r in rows if r.connections == c]
        xs = range(len(mine))
        heights = [r.rps or 0.0 for r in mine]
        low = [(r.rps - r.rps_min) if r.rps is not None else 0.0 for r in mine]
        high = [(r.rps_max - r.rps) if r.rps is not None else 0.0 for r in mine]
        ax.bar(
            xs,
            heights,
            yerr=[low, high],
            capsize=5,
            color=[colors[r.target] for r in mine],
        )
        for x, r in zip(xs, mine, strict=True):
            label = "failed" if r.rps is None else f"{r.rps:,.0f}"
            if r.x_nginx is not None and r.target not in ("nginx", "nginx-workers"):
                label += f"\n{r.x_nginx:.2f}× nginx"
            ax.annotate(
                label,
                (x, r.rps_max or 0.0),
                textcoords="offset points",
                xytext=(0, 4),
                ha="center",
                fontsize=8,
            )
        ax.set_xticks(list(xs), [r.target for r in mine], rotation=20, fontsize=8)
        ax.set_title(f"{c} connection{'s' if c != 1 else ''}")
        ax.set_ylabel("requests/s (median, bars: min..max)")
        ax.set_ylim(0, max([r.rps_max or 0.0 for r in mine] + [1.0]) * 1.25)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"Turnout benchmark · {meta['cpu_count']} cores · {meta['body_bytes']} B body · "
        f"wrk -t{meta['threads']} · {meta['rounds']}×{meta['duration_s']:g} s interleaved",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
