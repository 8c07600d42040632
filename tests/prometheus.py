"""Prometheus for the tests: the binaries from Debian's prometheus package (installed with
apt-get when missing), a server on loopback as a subprocess, its HTTP query API, and the PromQL
expressions of deploy/ (the rules and the Grafana dashboard)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "mmguard.json"
# the rules that need kube-state-metrics, absent where only the guard is scraped
KUBERNETES_RULES = DEPLOY / "prometheus" / "rules" / "mmguard-kubernetes.rules.yml"


def _tool(name: str) -> str:
    """`name` (promtool or prometheus), installed from Debian's prometheus package if missing."""
    found = shutil.which(name)
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.skip(f"{name} is missing and apt-get is unavailable to install it")
    if os.geteuid() != 0:
        pytest.skip(f"{name} is missing and installing it with apt-get needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"],
                ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]):  # fmt: skip
        done = subprocess.run(["nice", "-n", "19", *cmd], env=env, capture_output=True,
                              text=True, timeout=900, check=False)  # fmt: skip
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}"
    found = shutil.which(name)
    assert found, f"the prometheus package did not provide {name}"
    return found


def promtool() -> str:
    return _tool("promtool")


def prometheus_binary() -> str:
    return _tool("prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusProcess:
    """`prometheus` on 127.0.0.1 scraping `targets` every second, with `rule_files` evaluated
    every second; stopped (and killed if need be) by close()."""

    def __init__(self, workdir: Path, targets: list[str], rule_files: list[Path]) -> None:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": "mmguard", "static_configs": [{"targets": targets}]}],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            ["nice", "-n", "19", prometheus_binary(), f"--config.file={config_path}",
             f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, "prometheus exited:\n" + self.log()
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus is not ready:\n" + self.log()
            time.sleep(0.2)

    def wait_scraped(self, timeout_s: float = 30.0) -> None:
        """Wait for a first successful scrape of every target (`up` is 1 for each), so that
        traffic sent after it is counted as an increase between two scrapes. Prometheus runs
        niced: on a busy machine its first scrape can come seconds after it is ready."""
        deadline = time.monotonic() + timeout_s
        while True:
            up = self.query("up")
            if up and all(r["value"][1] == "1" for r in up):
                return
            assert time.monotonic() < deadline, f"no successful scrape: {up}\n" + self.log()
            time.sleep(0.2)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a successful answer (asserts success)."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # a bad query: 400 with the error in the body
            body = json.loads(exc.read())
        assert body["status"] == "success", f"{path} {params}: {body.get('error')}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result = data["result"]
        return result if data["resultType"] in ("vector", "matrix") else [{"value": result}]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def rules(path: Path) -> Iterator[dict[str, Any]]:
    """Every rule (recording or alerting) of a rule file."""
    for group in yaml.safe_load(path.read_text())["groups"]:
        yield from group["rules"]


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel, those inside rows included."""
    out = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query target."""
    return [(p["title"], t["expr"]) for p in dashboard_panels() for t in p.get("targets", [])]


# Grafana's variables, as a test evaluates them: every instance, windows that cover a short run
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1m",
    "$job": "mmguard",
    "$instance": ".*",
}


def grafana_to_promql(expr: str) -> str:
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    assert "$" not in expr, f"an unknown Grafana variable in {expr}"
    return expr


METRIC_NAME = re.compile(r"(?<![\w:\"])((?:guard[_:]|up\b)[\w:]*)")


def metric_names(expr: str) -> set[str]:
    """The guard metrics, recorded series (guard:...) and `up` an expression reads."""
    return set(METRIC_NAME.findall(expr))
