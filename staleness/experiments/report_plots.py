"""The sweep report's PNG plots (matplotlib, Agg: no display needed).

Every plot is written even without data (it then says so), so a report's links never break.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from staleness.experiments.report import PointSummary  # noqa: E402


def write_plots(report_dir: Path, points: list[PointSummary], at_seconds: float | None) -> None:
    write_reward_plot(report_dir / "reward_vs_wallclock.png", points, at_seconds)
    _save(report_dir / "throughput_vs_eta.png", *_throughput_vs_eta(points))
    settings, colors = _setting_colors(points)
    _save(report_dir / "staleness_histograms.png", *_staleness_histograms(points, settings, colors))


def write_reward_plot(path: Path, points: list[PointSummary], at_seconds: float | None) -> None:
    """Reward vs wall-clock since launch, one colour per setting."""
    _save(path, *_reward_vs_wallclock(points, _setting_colors(points)[1], at_seconds))


def _setting_colors(points: list[PointSummary]) -> tuple[list[str], dict]:
    settings = list(dict.fromkeys(p.setting for p in points))  # first-seen order
    return settings, {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(settings)}


def _save(path: Path, figure, has_data: bool) -> None:
    if not has_data:
        figure.text(0.5, 0.5, "no data yet", ha="center", va="center", fontsize=14, color="gray")
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def _reward_vs_wallclock(points: list[PointSummary], colors: dict, at_seconds: float | None):
    """One line per point (seed), one colour per setting."""
    figure, axes = plt.subplots(figsize=(8, 5))
    labelled = set()
    for point in points:
        if not point.curve:
            continue
        times, rewards = zip(*point.curve)
        label = point.setting if point.setting not in labelled else None
        labelled.add(point.setting)
        axes.plot(times, rewards, color=colors[point.setting], label=label, alpha=0.85, marker=".", markersize=4)
    if at_seconds is not None:
        axes.axvline(
            at_seconds, color="gray", linestyle="--", linewidth=1, label=f"common wall-clock {at_seconds:.0f} s"
        )
    axes.set(xlabel="wall-clock since launch (s)", ylabel="reward/mean", title="Reward vs wall-clock")
    if labelled:
        axes.legend(fontsize="small")
    return figure, bool(labelled)


def _throughput_vs_eta(points: list[PointSummary]):
    """Each seed as a dot, the seeds' mean as a line, one series per setting of the other grid keys."""
    series: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for point in points:
        if point.eta is not None and point.throughput is not None and math.isfinite(point.throughput):
            others = ", ".join(
                part for part in point.setting.split(", ") if not part.startswith(("eta=", "staleness.eta="))
            )
            series[others or "all"][point.eta].append(point.throughput)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, by_eta in series.items():
        etas = sorted(by_eta)
        line = axes.plot(etas, [statistics.fmean(by_eta[eta]) for eta in etas], marker="o", label=label)[0]
        for eta in etas:
            axes.scatter([eta] * len(by_eta[eta]), by_eta[eta], color=line.get_color(), s=12, alpha=0.5)
    axes.set(xlabel="staleness bound η", ylabel="trained samples/s", title="Throughput vs η")
    axes.set_xticks(sorted({eta for by_eta in series.values() for eta in by_eta}))
    if len(series) > 1:
        axes.legend(fontsize="small")
    return figure, bool(series)


def _staleness_histograms(points: list[PointSummary], settings: list[str], colors: dict):
    """Fraction of trained samples at each staleness, seeds pooled, one panel per setting."""
    pooled: dict[str, dict[int, int]] = {s: defaultdict(int) for s in settings}
    for point in points:
        for staleness, count in point.staleness_histogram.items():
            pooled[point.setting][staleness] += count
    cols = max(1, min(len(settings), 4))
    rows = max(1, math.ceil(len(settings) / cols))
    figure, grid = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    for axes, setting in zip(grid.flat, settings):
        counts = pooled[setting]
        total = sum(counts.values())
        if total:
            axes.bar(list(counts), [n / total for n in counts.values()], color=colors[setting])
            axes.set_xticks(list(counts))
        axes.set_title(setting, fontsize="small")
        axes.set_xlabel("staleness")
    for axes in grid[:, 0]:
        axes.set_ylabel("fraction of samples")
    for axes in list(grid.flat)[len(settings) :]:
        axes.set_visible(False)
    figure.suptitle("Staleness of trained samples")
    figure.tight_layout()
    return figure, any(sum(c.values()) for c in pooled.values())
