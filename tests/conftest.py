"""Shared test setup.

- GPU tests skip where no CUDA device is present; `--forbid-skips` (what `make test` and CI pass)
  fails the session if no test ran or any test other than a GPU one skipped.
- Under pytest-xdist (`-n N --dist loadgroup`), the tests of a module that share a module-scoped
  fixture (an engine process, a finished run) go to one worker, so the fixture is built once, and
  slow tests are handed out first, so the long ones do not all end up last on one worker.
- Each test process computes on one thread: xdist runs one test per core, and the runs the tests
  start split the cores between their own processes.
- Fixtures every module may use: `free_port`, `start_engine` (real engine processes for a module)
  and `buffer_service` (a real buffer process); builders without fixtures are in tests/helpers.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before anything imports torch

import itertools  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import ExitStack  # noqa: E402

import pytest  # noqa: E402


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_addoption(parser):
    parser.addoption(
        "--forbid-skips", action="store_true", help="fail unless tests ran and every skipped test is gpu-marked (CI)"
    )
    group = parser.getgroup("engine contract", "which engine tests/test_engine_api.py drives")
    group.addoption(
        "--engine",
        choices=("embedded", "sglang"),
        default="embedded",
        help="engine kind under test (sglang: a real server, `python -m sglang.launch_server`)",
    )
    group.addoption("--engine-model", default="tiny:llama", help="model spec or folder the engine serves")
    group.addoption("--engine-args", default="", help="extra server flags, one shell-quoted string")
    group.addoption("--engine-device", default="cpu", help="the embedded engine's device: cpu, cuda or cuda:N")


@pytest.hookimpl(tryfirst=True)  # before xdist turns the group marks into node ids
def pytest_collection_modifyitems(config, items):
    sglang = config.getoption("--engine") == "sglang"
    for item in items:
        if _uses_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
        if sglang and (mark := item.get_closest_marker("embedded_only")):
            item.add_marker(pytest.mark.skip(reason=f"SGLang limitation: {mark.args[0]}"))
    items.sort(key=lambda item: "slow" not in item.keywords)  # stable: file order otherwise
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _uses_module_fixture(item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    definitions = info.name2fixturedefs.values() if info is not None else ()
    return any(defs and defs[-1].scope == "module" for defs in definitions)


class SkipAudit:
    """Collects, from every test report (also those xdist workers send back), what must not happen."""

    def __init__(self) -> None:
        self.ran = 0
        self.unexpected: list[str] = []

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" and not report.skipped:
            self.ran += 1
        if report.skipped and "gpu" not in report.keywords:
            reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.unexpected.append(f"{report.nodeid}: {reason}")

    def pytest_terminal_summary(self, terminalreporter) -> None:
        for problem in self.problems():
            terminalreporter.write_line(f"--forbid-skips: {problem}", red=True, bold=True)

    def problems(self) -> list[str]:
        found = [f"skipped, and not a GPU test: {line}" for line in self.unexpected]
        return found + ([] if self.ran else ["no test ran"])

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus) -> None:
        if self.problems() and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config):
    if config.getoption("--forbid-skips") and not hasattr(config, "workerinput"):  # the xdist controller or a plain run
        config.pluginmanager.register(SkipAudit(), "skip-audit")


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """A function returning a free TCP port on loopback."""
    from rollout_workers.launcher import free_port as pick

    return pick


@pytest.fixture(scope="module")
def start_engine(tmp_path_factory) -> Iterator[Callable[..., object]]:
    """Start real engine processes for a module: start_engine(model=..., extra_args=..., **spec fields)
    returns the healthy EngineProcess; every one started is stopped when the module's tests are done."""
    from rollout_workers.launcher import EngineProcess, EngineSpec

    logs, numbers = tmp_path_factory.mktemp("engines"), itertools.count()
    with ExitStack() as stack:

        def start(model: str = "tiny:llama", *, env: dict[str, str] | None = None, **spec) -> EngineProcess:
            spec.setdefault("device", "cpu")
            process = EngineProcess(
                EngineSpec(model=model, **spec),
                log_path=logs / f"engine{next(numbers)}.log",
                env={"OMP_NUM_THREADS": "1", **(env or {})},
            )
            return stack.enter_context(process)

        yield start


@pytest.fixture
def buffer_service(tmp_path) -> Iterator[Callable[..., tuple[str, str]]]:
    """buffer_service(*serve_args) starts `async-rl buffer serve` on tmp_path/buffer and returns its
    (submit, serve) endpoints; stopped when the test ends."""
    from tests.helpers import buffer_endpoints, buffer_process

    with ExitStack() as stack:

        def start(*extra: str) -> tuple[str, str]:
            directory = tmp_path / "buffer"
            directory.mkdir(exist_ok=True)
            submit, serve = buffer_endpoints()
            stack.enter_context(buffer_process(directory, submit, serve, *extra))
            return submit, serve

        yield start
