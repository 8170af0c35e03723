"""The metrics endpoint on its own: a scrape answers while the jobs query fails or hangs, and an
empty listen address turns it off. (Metrics of a real server: tests/integration/test_metrics.py.)"""
from __future__ import annotations

import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from userexport_server import metrics as metrics_module
from userexport_server.metrics import Metrics
from userexport_server.settings import Settings

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def parse(text: str) -> Samples:
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """One metric's values by the value of `label` (its only label, or the one that differs)."""
    return {dict(labels)[label]: value for (sample, labels), value in samples.items() if sample == name}


def one(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_a_scrape_answers_without_jobs_while_the_database_is_down_or_hanging(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "JOBS_QUERY_TIMEOUT_SECONDS", 0.2)
    hang = threading.Event()

    def down() -> dict[str, int]:
        raise ConnectionRefusedError("the database is down")

    def hanging() -> dict[str, int]:
        hang.wait(10)
        return {}

    for count in (down, hanging):
        metrics = Metrics("127.0.0.1:0")
        metrics.collect_from(jobs=count, watchers=lambda: 3, health=lambda: {"database": False})
        port = metrics.start()
        try:
            for _ in range(2):  # the second scrape waits on the query still running, and answers alike
                started = time.monotonic()
                samples = parse(scrape(port))
                assert time.monotonic() - started < 2
                assert not by_label(samples, "userexport_jobs", "status")
                assert one(samples, "userexport_watchers") == 3
                assert one(samples, "userexport_health_check_healthy", check="database") == 0
        finally:
            metrics.stop()
    hang.set()


def test_an_empty_metrics_listen_turns_the_endpoint_off() -> None:
    assert Settings.from_env({}).metrics_listen == "127.0.0.1:9464"
    assert Settings.from_env({"USEREXPORT_METRICS_LISTEN": ""}).metrics_listen == ""
    assert Metrics("").start() == 0
