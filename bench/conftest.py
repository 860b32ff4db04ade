"""Benchmark session plumbing: collect result rows per subject and write them when the session ends."""

from __future__ import annotations

import pytest

from bench.harness import save_results

_COLLECTED: dict[tuple[str, str], dict] = {}


class ResultSink:
    """Rows of one benchmark subject on one device kind, saved as JSON + Markdown at session end."""

    def __init__(self, subject: str, device: str, columns: list[str]):
        key = (subject, device)
        entry = _COLLECTED.setdefault(key, {"columns": columns, "rows": []})
        self.rows = entry["rows"]

    def add(self, **row) -> None:
        self.rows.append(row)


@pytest.fixture(scope="session")
def result_sink():
    return ResultSink


def pytest_sessionfinish(session, exitstatus):
    for (subject, device), entry in _COLLECTED.items():
        path = save_results(subject, device, entry["rows"], entry["columns"])
        print(f"\nbenchmark results: {path}")
