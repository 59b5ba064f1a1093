"""`--forbid-skips` (what `make test` passes): a session fails loudly if no test ran or a test other
than a GPU one was skipped. Checked on throw-away test files with this suite's own conftest."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
CONFTEST = (Path(__file__).parent / "conftest.py").read_text()


@pytest.fixture
def suite(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs CUDA\n    slow: slow\n")
    return pytester


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_a_skip_that_is_not_a_gpu_test_fails_the_session(suite, workers):
    suite.makepyfile("import pytest\ndef test_ok(): pass\ndef test_quietly_skipped(): pytest.skip('no data')\n")
    result = suite.runpytest_subprocess("--forbid-skips", *workers)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*--forbid-skips: skipped, and not a GPU test: *test_quietly_skipped*no data*"])


def test_gpu_skips_are_allowed(suite):
    suite.makepyfile(
        "import pytest\ndef test_ok(): pass\n@pytest.mark.gpu\ndef test_cuda(): pytest.skip('needs a CUDA device')\n"
    )
    assert suite.runpytest_subprocess("--forbid-skips").ret == pytest.ExitCode.OK


def test_a_session_where_nothing_ran_fails(suite):
    suite.makepyfile("import pytest\n@pytest.mark.gpu\ndef test_cuda(): pytest.skip('needs a CUDA device')\n")
    result = suite.runpytest_subprocess("--forbid-skips")
    assert result.ret != pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*--forbid-skips: no test ran*"])


def test_without_the_flag_skips_pass(suite):
    suite.makepyfile("import pytest\ndef test_quietly_skipped(): pytest.skip('no data')\n")
    assert suite.runpytest_subprocess().ret == pytest.ExitCode.OK
