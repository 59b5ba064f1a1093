"""A sweep's report: one summary table (Markdown and HTML) and three PNG plots.

Inputs are what each point's run left behind: metrics.jsonl (trainer, one line per
logged step) and rollout_metrics.jsonl (rollout workers, cumulative counters and
per-interval busy fractions), plus the sweep's status files for times and outcomes.
Wall-clock is measured from the moment the sweep launched the point's run, so
start-up is included and the same for every setting.

    write_report(SWEEP_DIR) -> SWEEP_DIR/report/summary.md
"""

from __future__ import annotations

import html
import json
import math
import statistics
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

from async_rl.metrics import read_metrics
from staleness.experiments.sweep_status import Failure, PointStatus, SweepLayout

# Per-step rewards are noisy (one batch each): a reward "at" a time is the mean of this many logged steps.
REWARD_WINDOW = 5
HISTOGRAM_PREFIX = "staleness/hist/"
MISSING = "—"
PLOTS = {
    "reward_vs_wallclock.png": "Reward vs wall-clock",
    "throughput_vs_eta.png": "Throughput vs η",
    "staleness_histograms.png": "Staleness histograms",
}


class PointSummary(NamedTuple):
    name: str
    setting: str  # the grid values, e.g. "eta=2, alpha=0.25"
    seed: int
    status: str
    eta: int | None
    curve: list[tuple[float, float]]  # (seconds since launch, reward/mean) per logged step
    throughput: float | None  # trained samples/s
    final_reward: float | None
    staleness_histogram: dict[int, int]
    staleness_mean: float | None
    staleness_max: float | None
    recycled_tokens: int | None  # None: the run wrote no rollout_metrics.jsonl
    busy_fraction: float | None


# ---- calculations (pure) -------------------------------------------------------------------


def reward_curve(records: list[dict[str, Any]], t0: float) -> list[tuple[float, float]]:
    return [
        (r["time"] - t0, float(r["reward/mean"]))
        for r in records
        if isinstance(r.get("time"), (int, float)) and isinstance(r.get("reward/mean"), (int, float))
    ]


def reward_at(curve: list[tuple[float, float]], seconds: float = math.inf) -> float | None:
    """Mean reward of the last REWARD_WINDOW logged steps at or before `seconds`."""
    rewards = [reward for t, reward in curve if t <= seconds][-REWARD_WINDOW:]
    return statistics.fmean(rewards) if rewards else None


def common_wall_clock(curves: list[list[tuple[float, float]]]) -> float | None:
    """The latest time every curve reached: the fairest single time to compare rewards at."""
    ends = [curve[-1][0] for curve in curves if curve]
    return min(ends) if ends else None


def throughput(records: list[dict[str, Any]]) -> float | None:
    """Trained samples/s between the first and the last logged step (start-up excluded).

    Steps between logged ones (run.log_interval > 1) count as many samples as the logged step.
    A single logged step has no interval, so its own throughput/samples_per_s is used.
    """
    steps = [
        r for r in records if isinstance(r.get("time"), (int, float)) and isinstance(r.get("samples"), (int, float))
    ]
    if len(steps) >= 2 and steps[-1]["time"] > steps[0]["time"]:
        samples = sum(cur["samples"] * (cur["step"] - prev["step"]) for prev, cur in zip(steps, steps[1:]))
        return samples / (steps[-1]["time"] - steps[0]["time"])
    single = [
        r["throughput/samples_per_s"] for r in records if isinstance(r.get("throughput/samples_per_s"), (int, float))
    ]
    return float(single[-1]) if single else None


def staleness_histogram(records: list[dict[str, Any]]) -> dict[int, int]:
    """Trained samples by staleness, summed over the logged steps."""
    counts: Counter[int] = Counter()
    for record in records:
        for key, count in record.items():
            if key.startswith(HISTOGRAM_PREFIX) and isinstance(count, (int, float)):
                counts[int(key[len(HISTOGRAM_PREFIX) :])] += int(count)
    return dict(sorted(counts.items()))


def staleness_stats(histogram: dict[int, int]) -> tuple[float | None, float | None]:
    """(mean, max) staleness over every trained sample."""
    total = sum(histogram.values())
    if not total:
        return None, None
    return sum(k * n for k, n in histogram.items()) / total, float(max(k for k, n in histogram.items() if n))


def rollout_totals(lines: list[dict[str, Any]]) -> tuple[int, float | None]:
    """(tokens recycled, engine busy fraction) over all workers.

    Token counters are cumulative per worker, so each worker's largest value counts. Busy
    fractions are per interval since the worker's previous line, so they are averaged
    weighted by interval length; a worker's first line has no known interval and only
    counts when no line has one.
    """
    recycled: dict[Any, float] = {}
    weighted: list[tuple[float, float]] = []
    unweighted: list[float] = []
    previous_time: dict[Any, float] = {}
    for line in sorted(lines, key=lambda line: line.get("time") or 0.0):
        worker = line.get("worker")
        if isinstance(tokens := line.get("rollout/tokens_recycled"), (int, float)):
            recycled[worker] = max(recycled.get(worker, 0), tokens)
        fraction, now = line.get("rollout/engine_busy_fraction"), line.get("time")
        if isinstance(fraction, (int, float)) and math.isfinite(fraction):
            if isinstance(now, (int, float)) and worker in previous_time and now > previous_time[worker]:
                weighted.append((fraction, now - previous_time[worker]))
            else:
                unweighted.append(fraction)
        if isinstance(now, (int, float)):
            previous_time[worker] = now
    busy: float | None
    if weighted:
        busy = sum(f * dt for f, dt in weighted) / sum(dt for _, dt in weighted)
    else:
        busy = statistics.fmean(unweighted) if unweighted else None
    return int(sum(recycled.values())), busy


# ---- loading -------------------------------------------------------------------------------


def setting_labels(statuses: list[PointStatus]) -> dict[str, str]:
    """Point name -> "eta=2, alpha=0.25": the last part of each grid key, or the whole key
    where two keys share a last part."""
    keys = sorted({key for status in statuses for key in status.settings})
    last_parts = Counter(key.rsplit(".", 1)[-1] for key in keys)
    short = {key: key.rsplit(".", 1)[-1] if last_parts[key.rsplit(".", 1)[-1]] == 1 else key for key in keys}
    return {s.name: ", ".join(f"{short[k]}={v}" for k, v in s.settings.items()) or "recipe" for s in statuses}


def summarize_point(layout: SweepLayout, status: PointStatus, setting: str) -> PointSummary:
    run_dir = layout.run_dir(status.name)
    return summarize_run(
        run_dir,
        name=status.name,
        setting=setting,
        seed=status.seed,
        status=_status_text(status),
        eta=_eta(run_dir, status),
        started=status.started,
    )


def summarize_run(
    run_dir: Path, *, name: str, setting: str, seed: int, status: str, eta: int | None, started: float | None
) -> PointSummary:
    """One run folder's summary; wall-clock counts from `started` (else from its first logged step)."""
    records = _read_jsonl(run_dir / "metrics.jsonl")
    rollout_path = run_dir / "rollout_metrics.jsonl"
    recycled, busy = rollout_totals(_read_jsonl(rollout_path)) if rollout_path.exists() else (None, None)
    t0 = started if started is not None else (records[0]["time"] if records else 0.0)
    curve = reward_curve(records, t0)
    histogram = staleness_histogram(records)
    mean, maximum = staleness_stats(histogram)
    return PointSummary(
        name=name,
        setting=setting,
        seed=seed,
        status=status,
        eta=eta,
        curve=curve,
        throughput=throughput(records),
        final_reward=reward_at(curve),
        staleness_histogram=histogram,
        staleness_mean=mean,
        staleness_max=maximum,
        recycled_tokens=recycled,
        busy_fraction=busy,
    )


def _grid_order(status: PointStatus) -> tuple:
    """Grid order, numbers by value (eta=2 before eta=16), then seed."""

    def natural(value: str) -> tuple[int, float | str]:
        try:
            return 0, float(value)
        except ValueError:
            return 1, value

    return tuple(status.settings), tuple(natural(v) for v in status.settings.values()), status.seed


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(path) if isinstance(r, dict)] if path.exists() else []


def _eta(run_dir: Path, status: PointStatus) -> int | None:
    """The run's resolved staleness.eta (its config.json), else the grid's value."""
    try:
        return int(json.loads((run_dir / "config.json").read_text())["staleness"]["eta"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        return int(status.settings["staleness.eta"])
    except (KeyError, ValueError):
        return None


def _status_text(status: PointStatus) -> str:
    text = status.state.replace("_", " ")
    if status.failures:
        text += f" ({len(status.failures)} failed attempt{'s' * (len(status.failures) > 1)})"
    return text


# ---- rendering -----------------------------------------------------------------------------


class SummaryTable(NamedTuple):
    root: Path
    at_seconds: float | None  # the common wall-clock rewards are compared at
    header: list[str]
    rows: list[list[str]]
    failures: list[tuple[str, Failure]]  # (point name, failed attempt)


def write_report(sweep_dir: str | Path) -> Path:
    """Render SWEEP_DIR/report/ from the points on disk; returns summary.md's path."""
    from staleness.experiments.report_plots import write_plots

    layout = SweepLayout(sweep_dir)
    statuses = sorted(layout.all_statuses(), key=_grid_order)
    labels = setting_labels(statuses)
    points = [summarize_point(layout, status, labels[status.name]) for status in statuses]
    done = [p for p, s in zip(points, statuses) if s.done and p.curve] or [p for p in points if p.curve]
    table = summary_table(layout.root, points, common_wall_clock([p.curve for p in done]))
    table = table._replace(failures=[(s.name, f) for s in statuses for f in s.failures])
    layout.report.mkdir(parents=True, exist_ok=True)
    (layout.report / "summary.md").write_text(render_markdown(table))
    (layout.report / "summary.html").write_text(render_html(table))
    write_plots(layout.report, points, table.at_seconds)
    return layout.report / "summary.md"


def summary_table(root: Path, points: list[PointSummary], at_seconds: float | None) -> SummaryTable:
    at = f"{at_seconds:.1f} s" if at_seconds is not None else MISSING
    header = [
        "point",
        "seed",
        "throughput (samples/s)",
        f"reward at {at}",
        "final reward",
        "mean staleness",
        "max staleness",
        "recycled tokens",
        "engine busy",
        "status",
    ]
    rows = [
        [
            p.setting,
            str(p.seed),
            _fmt(p.throughput, "{:.1f}"),
            _fmt(reward_at(p.curve, at_seconds) if at_seconds is not None else None, "{:.3f}"),
            _fmt(p.final_reward, "{:.3f}"),
            _fmt(p.staleness_mean, "{:.2f}"),
            _fmt(p.staleness_max, "{:.0f}"),
            _fmt(p.recycled_tokens, "{:d}"),
            _fmt(p.busy_fraction, "{:.0%}"),
            p.status,
        ]
        for p in points
    ]
    return SummaryTable(root, at_seconds, header, rows, failures=[])


def _fmt(value: float | int | None, spec: str) -> str:
    return MISSING if value is None else spec.format(value)


def _explanation(at_seconds: float | None) -> list[str]:
    at = (
        f"{at_seconds:.1f} s after launch, the earliest wall-clock that every completed point reached"
        if at_seconds is not None
        else "not available: no point logged a step"
    )
    return [
        f"Reward at fixed wall-clock: {at}; rewards are means of the last {REWARD_WINDOW} logged steps up to that time "
        f"(final reward: of the last {REWARD_WINDOW} steps; {MISSING}: no step logged by then).",
        "Throughput: trained samples/s from the first to the last logged step. Staleness: over every trained sample. "
        f"Recycled tokens and engine busy fraction come from rollout_metrics.jsonl ({MISSING} where a run wrote none).",
    ]


def _ending(failure: Failure) -> str:
    return "stopped before it ended" if failure.exit_code is None else f"exit code {failure.exit_code}"


def render_markdown(table: SummaryTable) -> str:
    def row(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    lines = [
        f"# Sweep report: {table.root}",
        "",
        *_explanation(table.at_seconds),
        "",
        row(table.header),
        "|" + "|".join("---" for _ in table.header) + "|",
        *map(row, table.rows),
        "",
    ]
    lines += [f"![{title}]({name})" for name, title in PLOTS.items()]
    if table.failures:
        lines += ["", "## Failed attempts", ""]
        for name, failure in table.failures:
            lines += [
                f"- {name}, attempt {failure.attempt}: {_ending(failure)} (log ../{failure.log})",
                "",
                "  ```",
                *(f"  {line}" for line in failure.message.splitlines()),
                "  ```",
            ]
    return "\n".join(lines) + "\n"


def render_html(table: SummaryTable) -> str:
    e = html.escape
    cells = "<tr>" + "".join(f"<th>{e(h)}</th>" for h in table.header) + "</tr>\n"
    cells += "".join("<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>\n" for row in table.rows)
    notes = "".join(f"<p>{e(line)}</p>\n" for line in _explanation(table.at_seconds))
    images = "".join(
        f'<figure><img src="{name}" alt="{e(title)}"><figcaption>{e(title)}</figcaption></figure>\n'
        for name, title in PLOTS.items()
    )
    failed = "".join(
        f'<li>{e(name)}, attempt {f.attempt}: {_ending(f)} (<a href="../{e(f.log)}">log</a>)'
        f"<pre>{e(f.message)}</pre></li>"
        for name, f in table.failures
    )
    failed = f"<h2>Failed attempts</h2>\n<ul>{failed}</ul>\n" if failed else ""
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child,td:last-child{text-align:left}img{max-width:48em}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Sweep report</title><style>{style}</style>'
        f"</head><body>\n<h1>Sweep report: {e(str(table.root))}</h1>\n{notes}<table>\n{cells}</table>\n"
        f"{images}{failed}</body></html>\n"
    )
