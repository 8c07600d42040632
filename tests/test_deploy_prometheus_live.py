"""Prometheus on loopback scraping a live guard every second while clean and triggered traffic
flows: every PromQL expression of the Grafana dashboard and every recording rule returns data,
every alert evaluates on series that exist, the flag-ratio alert goes active on the triggered
traffic, and every metric the dashboard names is in a real scrape of the guard."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as tc
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Samples
from tests.prometheus import (
    KUBERNETES_RULES,
    RULE_FILES,
    PrometheusProcess,
    dashboard,
    dashboard_exprs,
    grafana_to_promql,
    metric_names,
    rules,
)
from tests.serving import ServerThread, running, serve_config

pytestmark = pytest.mark.slow  # the session artifact is calibrated with torch
MODEL = "tiny"
TRAFFIC_S = 6.0
GUARD_RULES = [p for p in RULE_FILES if p != KUBERNETES_RULES]


def _send_traffic(srv: ServerThread, samples: Samples) -> int:
    """Clean and triggered requests in turn (4 inputs each) for TRAFFIC_S seconds; returns the
    number of requests. Bounded in time and count, loopback only."""
    client = tc.InferenceServerClient(srv.url)
    sent = 0
    deadline = time.monotonic() + TRAFFIC_S
    try:
        while time.monotonic() < deadline and sent < 2000:
            for x in (samples.clean, samples.triggered):
                inp = tc.InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                client.infer(MODEL, [inp], client_timeout=30)
                sent += 1
            time.sleep(0.05)
    finally:
        client.close()
    return sent


@pytest.fixture(scope="module")
def live(
    artifact_dir: Path, samples: Samples, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerThread, PrometheusProcess]]:
    workdir = tmp_path_factory.mktemp("prometheus")
    with running(serve_config(artifact_dir, metrics_port=0)) as srv:
        prom = PrometheusProcess(workdir, [f"127.0.0.1:{srv.server.metrics_port}"], GUARD_RULES)
        try:
            prom.wait_ready()
            prom.wait_scraped()  # else the traffic may all come before the first sample
            assert _send_traffic(srv, samples) > 10
            yield srv, prom
        finally:
            prom.close()


def _wait_for_data(prom: PrometheusProcess, exprs: list[str], timeout_s: float = 20.0) -> dict:
    """Query each expression until every one returns data (rate() needs two scrapes, the
    rules an evaluation) or the time is up; returns {expr: result}."""
    deadline = time.monotonic() + timeout_s
    while True:
        results = {e: prom.query(e) for e in exprs}
        if all(results.values()) or time.monotonic() > deadline:
            return results
        time.sleep(1.0)


def test_every_dashboard_expression_returns_data(
    live: tuple[ServerThread, PrometheusProcess],
) -> None:
    _, prom = live
    exprs = [grafana_to_promql(e) for _, e in dashboard_exprs()]
    results = _wait_for_data(prom, exprs)
    empty = [e for e, r in results.items() if not r]
    assert not empty, "no data for:\n" + "\n".join(empty)
    # the template variables' label_values(guard_build_info{...}, job|instance)
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            found = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"]["query"])
            assert found, var["query"]
            series = prom.api("series", **{"match[]": grafana_to_promql(found.group(1))})
            assert [s[found.group(2)] for s in series], var["name"]


def test_every_rule_returns_data_and_the_flag_alert_goes_active(
    live: tuple[ServerThread, PrometheusProcess],
) -> None:
    _, prom = live
    recorded = [r for path in GUARD_RULES for r in rules(path) if "record" in r]
    alerts = [r for path in GUARD_RULES for r in rules(path) if "alert" in r]
    # each recording rule's expression and the series it records
    exprs = [r["expr"] for r in recorded] + [r["record"] for r in recorded]
    # an alert's expression is empty while it does not fire: every series it reads must exist
    exprs += sorted({name for r in alerts for name in metric_names(r["expr"])})
    results = _wait_for_data(prom, exprs)
    empty = [e for e, r in results.items() if not r]
    assert not empty, "no data for:\n" + "\n".join(empty)
    for rule in alerts:
        prom.query(rule["expr"])  # evaluates without error
    groups = prom.api("rules")["groups"]
    health = {r["name"]: (r["health"], r.get("lastError")) for g in groups for r in g["rules"]}
    assert all(h == "ok" for h, _ in health.values()), health
    # triggered traffic is half of all: the flag ratio is far above the 0.005 baseline
    # (rules run every second; a loaded machine can lag them by many seconds)
    deadline = time.monotonic() + 60
    while True:
        active = {a["labels"]["alertname"]: a["state"] for a in prom.api("alerts")["alerts"]}
        if "GuardFlagRatioHigh" in active or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    sides = {
        e: prom.query(e)
        for e in (
            "guard:flag_ratio:rate5m",
            "guard:flag_ratio_baseline:1d",
            "guard:inferences:rate5m",
        )
    }
    assert active.get("GuardFlagRatioHigh") in ("pending", "firing"), (active, sides)  # for: 5m
    assert "GuardDown" not in active and "GuardErrorRatioHigh" not in active, active


def test_every_metric_the_dashboard_names_is_in_a_real_scrape(
    live: tuple[ServerThread, PrometheusProcess],
) -> None:
    srv, _ = live
    url = f"http://127.0.0.1:{srv.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    scraped = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    recorded = {r["record"] for path in RULE_FILES for r in rules(path) if "record" in r}
    for title, expr in dashboard_exprs():
        for name in metric_names(expr):
            if name == "up":  # Prometheus's own
                continue
            known = recorded if ":" in name else scraped
            assert name in known, f"panel {title!r} reads {name}, which nothing exports"
