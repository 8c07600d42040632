"""The monitoring files of deploy/ on their own: `promtool check rules` and `promtool test rules`,
the Prometheus configuration, the Grafana dashboard (ready for file provisioning, unique panel
ids, every recorded series it reads defined by a rule) and its provisioning files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.prometheus import (
    DEPLOY,
    RULE_FILES,
    dashboard,
    dashboard_exprs,
    dashboard_panels,
    metric_names,
    promtool,
    rules,
)

RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))


def _promtool(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(["nice", "-n", "19", promtool(), *args], capture_output=True,
                          text=True, timeout=120, check=False, cwd=cwd)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_promtool_checks_the_rules() -> None:
    assert RULE_FILES
    out = _promtool("check", "rules", *map(str, RULE_FILES))
    assert "SUCCESS" in out


def test_promtool_unit_tests_pass_and_cover_every_rule() -> None:
    assert RULE_TESTS
    out = _promtool("test", "rules", *map(str, RULE_TESTS))
    assert "SUCCESS" in out and "FAILED" not in out
    tested, recorded_tested = set(), set()
    for path in RULE_TESTS:
        spec = yaml.safe_load(path.read_text())
        loaded = {(path.parent / f).resolve() for f in spec["rule_files"]}
        assert loaded == {p.resolve() for p in RULE_FILES}, "a unit test file misses a rule file"
        for case in spec["tests"]:
            for check in case.get("alert_rule_test", []):
                if check["exp_alerts"]:  # a case where it fires, not only one where it must not
                    tested.add(check["alertname"])
            for check in case.get("promql_expr_test", []):
                if check["exp_samples"]:
                    recorded_tested.add(check["expr"].split("{")[0])
    alerts = {r["alert"] for p in RULE_FILES for r in rules(p) if "alert" in r}
    assert alerts == tested, f"alerts without a firing unit test: {sorted(alerts - tested)}"
    recorded = {r["record"] for p in RULE_FILES for r in rules(p) if "record" in r}
    assert recorded <= recorded_tested, f"untested: {sorted(recorded - recorded_tested)}"


def test_every_rule_is_named_and_labelled() -> None:
    for path in RULE_FILES:
        for rule in rules(path):
            if "record" in rule:
                assert rule["record"].startswith("guard:"), rule["record"]  # level:metric:ops
            else:
                assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
                assert rule["annotations"]["summary"], rule["alert"]


def test_the_prometheus_configuration_is_valid(tmp_path: Path) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert "mmguard" in jobs  # the rules and the dashboard select job="mmguard"
    # compose mounts deploy/prometheus/rules at /etc/prometheus/rules
    local = [str(DEPLOY / "prometheus" / "rules" / Path(f).name) for f in config["rule_files"]]
    assert all(Path(f).is_file() for f in local), config["rule_files"]
    config["rule_files"] = local
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    _promtool("check", "config", str(tmp_path / "prometheus.yml"))


def test_the_dashboard_is_ready_for_file_provisioning() -> None:
    board = dashboard()
    assert "__inputs" not in board and "__requires" not in board
    assert board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    provisioned = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )
    uids = {d["uid"] for d in provisioned["datasources"]}
    assert variables["datasource"]["current"]["value"] in uids
    text = (DEPLOY / "grafana" / "dashboards" / "mmguard.json").read_text()
    assert "${DS_" not in text  # an export's input placeholder
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        sources = [panel["datasource"], *(t["datasource"] for t in panel["targets"])]
        assert all(s == {"type": "prometheus", "uid": "${datasource}"} for s in sources), panel


def test_dashboard_panel_ids_are_unique_and_it_covers_the_issue() -> None:
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), ids
    for panel in panels:
        if panel["type"] != "row":
            assert panel["targets"] and panel["gridPos"]["w"] > 0, panel["title"]
    read = {name for _, expr in dashboard_exprs() for name in metric_names(expr)}
    for name in ("guard_requests_total", "guard_request_duration_seconds_bucket",
                 "guard_flagged_total", "guard_inferences_total", "guard_corrections_total",
                 "guard_p_value_bucket", "guard_batch_size_bucket",
                 "guard_stage_duration_seconds_bucket", "guard_queue_depth",
                 "guard_inflight_requests", "guard_build_info"):  # fmt: skip
        assert name in read, name
    assert any(p["type"] == "heatmap" and "p_value" in p["targets"][0]["expr"] for p in panels)


def test_recorded_series_the_dashboard_reads_are_defined() -> None:
    recorded = {r["record"] for p in RULE_FILES for r in rules(p) if "record" in r}
    for title, expr in dashboard_exprs():
        for name in metric_names(expr):
            if ":" in name:
                assert name in recorded, f"panel {title!r} reads {name}, which no rule records"


def test_the_dashboard_provider_points_at_the_mounted_folder() -> None:
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "mmguard.yaml").read_text()
    )["providers"][0]
    assert provider["type"] == "file"
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
