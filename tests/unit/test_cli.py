"""The kombu-rpc command line."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import uuid
from decimal import Decimal

import pytest

import kombu_rpc
from kombu_rpc._cli import build_parser, main, to_json


def test_demo_on_memory_prints_fib_and_a_rate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--calls", "50"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "fib(30) = 832040"
    assert out[1].startswith("50 sequential calls in ") and out[1].endswith(" calls/s")


@pytest.mark.parametrize("broker", ["nosuch://x", "amqp://guest:guest@127.0.0.1:1//"])
def test_demo_reports_a_bad_or_unreachable_broker_as_one_error_line(
    capsys: pytest.CaptureFixture[str], broker: str
) -> None:
    assert main(["demo", "--broker", broker]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and err.count("\n") == 1


def test_python_dash_m_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kombu_rpc", "demo", "--calls", "10"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "fib(30) = 832040" in done.stdout


def test_results_print_as_readable_json() -> None:
    # Given the types kombu's JSON carries beyond JSON's own, and non-ASCII text
    value = {
        "when": datetime.datetime(2024, 5, 17, 12, 30, 5, 123000),
        "day": datetime.date(2024, 5, 17),
        "at": datetime.time(8, 15),
        "price": Decimal("1.10"),
        "id": uuid.UUID(int=1),
        "bytes": "café".encode(),
        "binary": b"\xff",
        "tags": {"a"},
        "text": "CAFÉ",
    }
    # Then each prints as a string a user can read, text as is
    assert json.loads(to_json(value)) == {
        "when": "2024-05-17T12:30:05.123000",
        "day": "2024-05-17",
        "at": "08:15:00",
        "price": "1.10",
        "id": "00000000-0000-0000-0000-000000000001",
        "bytes": "café",
        "binary": "/w==",
        "tags": ["a"],
        "text": "CAFÉ",
    }
    assert to_json("CAFÉ") == '"CAFÉ"'
    assert to_json([1], indent=2) == "[\n  1\n]"


def test_usage_errors_are_one_error_line_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["call", "fib", "--timeout", "soon"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        "Error: argument -t/--timeout: expected a positive number of seconds, got 'soon' "
        "(see 'kombu-rpc call --help')\n"
    )


def test_kwargs_that_are_not_a_json_object_name_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["call", "fib", "--kwargs", "b=2", "--broker", "amqp://h//"]) == 2
    assert capsys.readouterr().err == (
        """Error: --kwargs: expected a JSON object, e.g. '{"b": 2}', got 'b=2'\n"""
    )


@pytest.mark.parametrize("command", ["call fib", "describe", "ping", "serve services"])
def test_memory_broker_is_refused_at_once_with_a_hint(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    assert main([*command.split(), "--broker", "memory://"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: memory:// only reaches servers in the same process") and "demo" in err


def test_version_names_kombu_rpc_and_kombu(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.startswith(f"kombu-rpc {kombu_rpc.__version__} (kombu ")


@pytest.mark.parametrize("command", [[], ["serve"], ["call"], ["describe"], ["ping"], ["demo"]])
def test_every_help_shows_examples(capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main([*command, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert "\nexamples:\n  kombu-rpc " in out


def test_short_options() -> None:
    args = build_parser().parse_args(
        ["serve", "svc", "-b", "amqp://h//", "-q", "q1", "-c", "3", "-l", "debug"]
    )
    assert (args.broker, args.queue, args.concurrency, args.loglevel) == ("amqp://h//", "q1", 3, "debug")
    args = build_parser().parse_args(["call", "f", "-t", "2.5", "-q", "q2"])
    assert (args.timeout, args.queue) == (2.5, "q2")
    assert build_parser().parse_args(["ping"]).timeout == 1.0


def test_verbose_is_taken_before_or_after_the_command() -> None:
    assert build_parser().parse_args(["-v", "describe"]).verbose is True
    assert build_parser().parse_args(["describe", "-v"]).verbose is True
    assert build_parser().parse_args(["describe"]).verbose is False
