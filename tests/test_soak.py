"""A short run of the soak and fuzz harness (benchmarks/soak.py) on the tone engine: every kind of
faulty client at once, fuzzed frames, and the checks the long run reports, so the harness cannot
rot and the faults are tried together, not only one by one."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


def row(report: str, name: str) -> str:
    match = re.search(rf"^\| {re.escape(name)} \| (.*) \|$", report, re.M)
    assert match, f"no row {name!r} in:\n{report}"
    return match[1]


@pytest.mark.slow
def test_a_short_soak_loses_nothing_and_answers_every_fuzzed_frame():
    r = subprocess.run(
        [
            sys.executable,
            "benchmarks/soak.py",
            "--engine",
            "tone",
            "--sessions",
            "4",
            "--seconds",
            "8",
            "--faulty",
            "1",
            "--fuzzers",
            "1",
            "--fuzz-frames",
            "200",
            "--send-timeout",
            "1",
            "--close-timeout",
            "1",
            "--idle-timeout",
            "3",
            "--context-idle-timeout",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = r.stdout
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(row(report, "errored")) == 0, report
    assert int(row(report, "done")) > 0 and int(row(report, "hog's contexts ended")) >= 1
    frames, untyped = (int(x) for x in row(report, "fuzzed frames / untyped answers").split(" / "))
    assert frames >= 200 and untyped == 0, report
    cut, left_open = (
        int(x) for x in row(report, "never-reading sockets cut off / left open").split(" (")[0].split(" / ")
    )
    assert cut >= 1 and left_open == 0, report
    checked = row(report, "audio bytes == done stats").split(" of ")
    assert checked[0] == checked[1], report
    assert row(report, "/health answered / failed (slowest ms)").split(" / ")[1].startswith("0 "), report
