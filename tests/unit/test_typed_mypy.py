"""mypy checks remote calls through typed proxies: a sample that must type-check, and
one whose every marked line must be reported with the marked error code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api", reason="mypy is part of the test extra")

pytestmark = pytest.mark.timeout(300)

SAMPLES = Path(__file__).parent.parent / "typing"


def mypy(path: Path, cache: Path) -> tuple[int, str]:
    out, err, status = mypy_api.run(
        ["--strict", "--no-error-summary", "--show-error-codes", "--cache-dir", str(cache), str(path)]
    )
    return status, out + err


def test_typed_calls_that_fit_the_interface_type_check(tmp_path: Path) -> None:
    status, output = mypy(SAMPLES / "typed_ok.py", tmp_path)
    assert status == 0, output


def test_typed_calls_that_do_not_fit_are_reported(tmp_path: Path) -> None:
    sample = SAMPLES / "typed_bad.py"
    expected = {
        (number, code)
        for number, line in enumerate(sample.read_text().splitlines(), 1)
        for code in re.findall(r"# E: ([a-z-]+)", line)
    }
    status, output = mypy(sample, tmp_path)
    reported = {
        (int(number), code)
        for number, code in re.findall(r"typed_bad\.py:(\d+): error: .*\[([a-z-]+)\]$", output, re.M)
    }
    assert status == 1, output
    assert expected and reported == expected, output
