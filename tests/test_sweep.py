"""`async-rl sweep`: planning, resume, real sweeps on the tiny recipe, and the report's numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from staleness.experiments import report
from staleness.experiments.sweep import plan_points, prepare
from staleness.experiments.sweep_status import PointStatus, SweepLayout

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ["reward_vs_wallclock.png", "throughput_vs_eta.png", "staleness_histograms.png"]
# As short as a real run gets: ~10 s each, mostly start-up.
TINY = [
    "--set",
    "trainer.total_steps=3",
    "--set",
    "trainer.groups_per_step=2",
    "--set",
    "rollout.group_size=4",
    "--set",
    "run.max_wall_s=120",
]


def sweep(*args: str, timeout_s: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "async_rl.cli", "sweep", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, f"{path}: {len(data)} bytes, starts {data[:8]!r}"


def table_rows(summary_md: Path) -> list[list[str]]:
    lines = [line for line in summary_md.read_text().splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


# ---- real sweeps -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    result = sweep("recipes/tiny.toml", "--grid", "staleness=0,2", "--out", str(out), *TINY)
    logs = "".join(f"\n--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted((out / "logs").glob("*.log")))
    assert result.returncode == 0, result.stdout + result.stderr + logs
    return out


@pytest.mark.slow
def test_sweep_writes_report_with_every_point(tiny_sweep):
    summary = tiny_sweep / "report" / "summary.md"
    rows = table_rows(summary)
    assert [row[0] for row in rows] == ["eta=0", "eta=2"]
    assert all(row[-1] == "finished" for row in rows)
    assert all(float(row[2]) > 0 for row in rows), rows  # throughput
    assert all(row[7] == report.MISSING for row in rows) or all(row[7].isdigit() for row in rows)  # recycled tokens
    html = (tiny_sweep / "report" / "summary.html").read_text()
    assert html.count("<tr>") == 3 and "eta=2" in html
    for name in PLOTS:
        assert_png(tiny_sweep / "report" / name)
    for name in ("staleness.eta=0__seed=0", "staleness.eta=2__seed=0"):
        config = json.loads((tiny_sweep / "points" / name / "config.json").read_text())
        assert config["staleness"]["eta"] == int(name[14]) and config["trainer"]["total_steps"] == 3
        assert config["run"]["output_dir"] == str(tiny_sweep / "points" / name)


@pytest.mark.slow
def test_second_invocation_runs_nothing_finished(tiny_sweep):
    layout = SweepLayout(tiny_sweep)
    before = {p.name: p.stat().st_mtime_ns for p in layout.points.iterdir()}
    metrics_before = {name: (layout.run_dir(name) / "metrics.jsonl").read_bytes() for name in before}
    result = sweep("recipes/tiny.toml", "--grid", "staleness=0,2", "--out", str(tiny_sweep), *TINY)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 point(s), 2 already done" in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in layout.points.iterdir()} == before
    assert {name: (layout.run_dir(name) / "metrics.jsonl").read_bytes() for name in before} == metrics_before
    assert all(status.attempts == 1 and status.state == "finished" for status in layout.all_statuses())


@pytest.mark.slow
def test_report_only_rerenders(tiny_sweep):
    (tiny_sweep / "report" / "summary.html").unlink()
    result = sweep("--report-only", str(tiny_sweep))
    assert result.returncode == 0, result.stderr
    assert "eta=0" in (tiny_sweep / "report" / "summary.html").read_text()


def test_crashed_point_is_recorded_and_rerun(tmp_path):
    # Passes every check before the run (the path is only looked for when the run starts): a failure in seconds.
    args = ["recipes/tiny.toml", "--out", str(tmp_path), "--set", "model.spec=/no_such_model"]
    first = sweep(*args)
    assert first.returncode == 1 and "did not complete" in first.stderr
    second = sweep(*args)
    assert second.returncode == 1
    [status] = SweepLayout(tmp_path).all_statuses()
    assert status.state == "failed" and status.attempts == 2
    assert [(f.attempt, f.exit_code) for f in status.failures] == [(1, 2), (2, 2)]
    assert "no_such_model" in status.failures[0].message
    assert all((tmp_path / f.log).exists() for f in status.failures)
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "Failed attempts" in summary and "no_such_model" in summary
    assert table_rows(tmp_path / "report" / "summary.md")[0][-1] == "failed (2 failed attempts)"


@pytest.mark.parametrize(
    "grid, message",
    [
        ("staleness.etaa=0,1", "unknown key 'staleness.etaa'"),
        ("staleness=0,-1", "eta=-1 must be >= 0"),
        ("trainer.lr=fast", "trainer.lr"),
        ("run.output_dir=a,b", "--out"),
        ("rollout.reward=recipes.rewards:no_such_reward", "no_such_reward"),  # what `async-rl run` would refuse
        ("staleness", "must look like section.key=value1,value2"),
    ],
)
def test_bad_grid_is_refused_before_anything_runs(tmp_path, grid, message):
    out = tmp_path / "sweep"
    result = sweep("recipes/tiny.toml", "--grid", grid, "--out", str(out))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_ray_sweep_on_a_local_cluster(tmp_path):
    pytest.importorskip("ray")
    result = sweep(
        "recipes/tiny.toml",
        "--grid",
        "staleness=0,1",
        "--out",
        str(tmp_path),
        "--ray-address",
        "local",
        *TINY,
        timeout_s=280,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "submitted 2 point(s) to Ray" in result.stdout
    assert [row[-1] for row in table_rows(tmp_path / "report" / "summary.md")] == ["finished", "finished"]


# ---- planning and resume (no runs) -------------------------------------------------------------


def test_plan_is_the_grid_product_times_seeds():
    from staleness.experiments.sweep import parse_grid

    points = plan_points(
        str(ROOT / "recipes/tiny.toml"),
        [parse_grid("staleness=0,1"), parse_grid("trainer.lr=1e-3,2e-3")],
        seeds=2,
        overrides=["trainer.total_steps=5"],
    )
    assert len(points) == 8 and len({p.name for p in points}) == 8
    first = points[0]
    assert first.name == "staleness.eta=0__trainer.lr=1e-3__seed=0"
    assert first.overrides == [
        "trainer.total_steps=5",
        "staleness.eta=0",
        "trainer.lr=1e-3",
        "trainer.seed=0",
        "task.seed=0",
    ]
    assert points[1].overrides[-2:] == ["trainer.seed=1", "task.seed=1"]


def test_prepare_reruns_interrupted_points_and_refuses_changed_ones(tmp_path):
    from staleness.experiments.sweep import SweepError

    layout = SweepLayout(tmp_path)
    point = PointStatus(
        name="p", settings={"staleness.eta": "1"}, seed=0, config="c.toml", overrides=["staleness.eta=1"]
    )
    done = PointStatus(
        name="q",
        settings={"staleness.eta": "2"},
        seed=0,
        config="c.toml",
        overrides=["staleness.eta=2"],
        state="finished",
        attempts=1,
    )
    layout.write_status(PointStatus(**{**_fields(point), "state": "running", "attempts": 1}))
    layout.write_status(done)
    pending = prepare(layout, [point, done])
    assert [p.name for p in pending] == ["p"]
    assert pending[0].failures[0].exit_code is None and "stopped" in pending[0].failures[0].message
    assert layout.read_status("p").state == "failed"
    changed = PointStatus(**{**_fields(done), "overrides": ["staleness.eta=3"]})
    with pytest.raises(SweepError, match="another --out"):
        prepare(layout, [changed])


def _fields(status: PointStatus) -> dict:
    import msgspec

    return msgspec.structs.asdict(status)


# ---- report calculations on synthetic metrics ------------------------------------------------------


def steps(times: list[float], rewards: list[float], samples: int = 8, **extra) -> list[dict]:
    return [
        {"step": i + 1, "time": t, "reward/mean": r, "samples": samples, **extra}
        for i, (t, r) in enumerate(zip(times, rewards))
    ]


def test_throughput_counts_samples_between_first_and_last_logged_step():
    assert report.throughput(steps([10.0, 11.0, 13.0], [0, 0, 0])) == pytest.approx(16 / 3)
    logged_every_2 = [{"step": 2, "time": 0.0, "samples": 4}, {"step": 4, "time": 2.0, "samples": 4}]
    assert report.throughput(logged_every_2) == pytest.approx(4.0)
    assert report.throughput([{"step": 1, "time": 5.0, "samples": 8, "throughput/samples_per_s": 3.5}]) == 3.5
    assert report.throughput([]) is None


def test_reward_at_fixed_wall_clock_uses_the_last_window_before_it():
    curve = report.reward_curve(steps([100 + t for t in range(10)], [float(t) for t in range(10)]), t0=100.0)
    assert report.reward_at(curve, 6.5) == pytest.approx((2 + 3 + 4 + 5 + 6) / 5)
    assert report.reward_at(curve, 0.0) == 0.0
    assert report.reward_at(curve, -1.0) is None
    assert report.reward_at(curve) == pytest.approx(7.0)  # final: mean of steps 5..9
    assert report.common_wall_clock([curve, curve[:4], []]) == 3.0


def test_staleness_from_histograms_weights_every_sample():
    records = [{"staleness/hist/0": 6, "staleness/hist/1": 2}, {"staleness/hist/1": 4, "staleness/hist/3": 4}]
    histogram = report.staleness_histogram(records)
    assert histogram == {0: 6, 1: 6, 3: 4}
    assert report.staleness_stats(histogram) == (pytest.approx(18 / 16), 3.0)
    assert report.staleness_stats({}) == (None, None)


def test_rollout_totals_sum_workers_and_weight_busy_by_interval():
    lines = [
        {"time": 0.0, "worker": 0, "rollout/tokens_recycled": 0, "rollout/engine_busy_fraction": 0.1},
        {"time": 1.0, "worker": 0, "rollout/tokens_recycled": 10, "rollout/engine_busy_fraction": 0.5},
        {"time": 4.0, "worker": 0, "rollout/tokens_recycled": 30, "rollout/engine_busy_fraction": 1.0},
        {"time": 0.5, "worker": 1, "rollout/tokens_recycled": 7, "rollout/engine_busy_fraction": 0.2},
    ]
    recycled, busy = report.rollout_totals(lines)
    assert recycled == 37
    assert busy == pytest.approx((0.5 * 1 + 1.0 * 3) / 4)  # first lines have no interval
    assert report.rollout_totals(lines[3:]) == (7, pytest.approx(0.2))


def write_point(
    layout: SweepLayout, name: str, eta: str, records: list[dict], rollout: list[dict] | None, started: float, **status
) -> None:
    layout.write_status(
        PointStatus(
            name=name,
            settings={"staleness.eta": eta},
            seed=0,
            config="c.toml",
            overrides=[f"staleness.eta={eta}"],
            state="finished",
            attempts=1,
            started=started,
            **status,
        )
    )
    run_dir = layout.run_dir(name)
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"torn')
    if rollout is not None:
        (run_dir / "rollout_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rollout))


def test_report_from_synthetic_points(tmp_path):
    layout = SweepLayout(tmp_path)
    hist = {"staleness/hist/0": 4, "staleness/hist/1": 4}
    write_point(layout, "a", "0", steps([1000 + t for t in range(1, 11)], [0.1 * t for t in range(10)]), None, 1000.0)
    write_point(
        layout,
        "b",
        "1",
        steps([2000 + 2 * t for t in range(1, 5)], [0.5] * 4, **hist),
        [{"time": 2001.0, "worker": 0, "rollout/tokens_recycled": 12, "rollout/engine_busy_fraction": 0.75}],
        2000.0,
    )
    report.write_report(tmp_path)
    header, a, b = [
        row for row in (tmp_path / "report" / "summary.md").read_text().splitlines() if row.startswith("| ")
    ]
    assert "reward at 8.0 s" in header  # b's last step: 8 s after launch; a ran longer
    a, b = ([c.strip() for c in row.strip("|").split("|")] for row in (a, b))
    assert a[:5] == [
        "eta=0",
        "0",
        "8.0",
        f"{(0.3 + 0.4 + 0.5 + 0.6 + 0.7) / 5:.3f}",
        f"{(0.5 + 0.6 + 0.7 + 0.8 + 0.9) / 5:.3f}",
    ]
    assert a[7:9] == [report.MISSING, report.MISSING]  # no rollout_metrics.jsonl
    assert b[:9] == ["eta=1", "0", "4.0", "0.500", "0.500", "0.50", "1", "12", "75%"]
    for name in PLOTS:
        assert_png(tmp_path / "report" / name)


def test_report_of_points_without_metrics_still_renders(tmp_path):
    layout = SweepLayout(tmp_path)
    layout.write_status(PointStatus(name="p", settings={}, seed=3, config="c.toml", overrides=[]))
    report.write_report(tmp_path)
    [row] = table_rows(tmp_path / "report" / "summary.md")
    assert row[:3] == ["recipe", "3", report.MISSING] and row[-1] == "pending"
    for name in PLOTS:
        assert_png(tmp_path / "report" / name)
