"""Shared test setup.

- GPU tests skip where no CUDA device is present; `--forbid-skips` (what `make test` and CI pass)
  fails the session if no test ran or any test other than a GPU one skipped.
- Under pytest-xdist (`-n N --dist loadgroup`), the tests of a module that share a module-scoped
  fixture (an engine process, a finished run) go to one worker, so the fixture is built once, and
  slow tests are handed out first, so the long ones do not all end up last on one worker.
- Each test process computes on one thread: xdist runs one test per core, and the runs the tests
  start split the cores between their own processes.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before anything imports torch

import pytest  # noqa: E402


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_addoption(parser):
    parser.addoption("--forbid-skips", action="store_true",
                     help="fail unless tests ran and every skipped test is gpu-marked (CI)")
    group = parser.getgroup("engine contract", "which engine tests/test_engine_api.py drives")
    group.addoption("--engine", choices=("embedded", "sglang"), default="embedded",
                    help="engine kind under test (sglang: a real server, `python -m sglang.launch_server`)")
    group.addoption("--engine-model", default="tiny:llama", help="model spec or folder the engine serves")
    group.addoption("--engine-args", default="", help="extra server flags, one shell-quoted string")


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
