"""`mmguard serve` configuration: validation at construction, the command line, the token from a
file or the environment, the manifest's decision rule with overrides; plus the small helpers
(quarantine cap, log formats, metric buckets, CPU count)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from guard.cli import build_parser
from guard.config import BatchingConfig, QuarantineConfig, ServeConfig
from guard.logs import JsonFormatter, TextFormatter
from guard.metrics import batch_buckets, outcome, statistic_buckets
from guard.mmdf import DecisionRule, Null
from guard.quarantine import Quarantine
from guard.serve_cli import config_from_args
from guard.server import usable_cpus


def _args(*argv: str) -> Any:
    return build_parser("serve").parse_args(["serve", "art", *argv])


def test_defaults_and_flags_become_one_frozen_config() -> None:
    cfg = config_from_args(_args())
    assert cfg.port == 8001 and cfg.metrics_port == 8002 and cfg.mode == "enforce"
    assert cfg.alpha is None and cfg.flag_on_disagreement is None and cfg.auth_token is None
    assert cfg.batching.warmup_sizes == tuple(range(1, 33))
    cfg = config_from_args(_args(
        "--mode", "shadow", "--alpha", "0.01", "--no-flag-on-disagreement", "--no-metrics",
        "--max-batch-size", "16", "--max-queue-delay-ms", "5", "--max-queue-size", "3",
        "--warmup-batch-sizes", "1,16,8", "--quarantine-dir", "q", "--quarantine-max-mb", "1",
    ))  # fmt: skip
    assert cfg.mode == "shadow" and cfg.alpha == 0.01 and cfg.flag_on_disagreement is False
    assert cfg.metrics_port is None
    assert cfg.batching == BatchingConfig(16, 5.0, 3, (1, 16, 8))
    assert cfg.batching.warmup_sizes == (1, 8, 16)
    assert cfg.quarantine == QuarantineConfig(Path("q"), max_bytes=1 << 20)
    assert config_from_args(_args("--mode", "unguarded")).mode == "unguarded"
    with pytest.raises(AttributeError):
        cfg.port = 1  # type: ignore[misc]


def test_overrides_apply_to_the_manifest_rule() -> None:
    manifest = DecisionRule(alpha=0.005, flag_on_disagreement=False)
    assert ServeConfig(Path("a")).decision_rule(manifest) == manifest
    rule = ServeConfig(Path("a"), alpha=0.05, flag_on_disagreement=True).decision_rule(manifest)
    assert rule == DecisionRule(alpha=0.05, flag_on_disagreement=True)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"mode": "audit"}, "mode"),
        ({"device": "tpu"}, "device"),
        ({"port": 70000}, "port"),
        ({"alpha": 1.5}, "alpha"),
        ({"threads": -1}, "threads"),
        ({"shutdown_grace_s": -1.0}, "shutdown_grace_s"),
        ({"max_message_bytes": 10}, "max_message_bytes"),
        ({"auth_token": "  "}, "token"),
    ],
)
def test_bad_values_are_refused_naming_the_field(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        ServeConfig(Path("a"), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_queue_size": 0}, "max_queue_size"),
        ({"max_queue_delay_ms": -1}, "max_queue_delay_ms"),
        ({"max_batch_size": 4, "warmup_batch_sizes": (8,)}, "warm-up batch size 8"),
    ],
)
def test_bad_batching_values_are_refused(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        BatchingConfig(**kwargs)


def test_the_token_comes_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("abc123\n")
    assert config_from_args(_args("--auth-token-file", str(tmp_path / "token"))).auth_token == (
        "abc123"
    )
    monkeypatch.setenv("GUARD_TOKEN", "xyz")
    cfg = config_from_args(_args("--auth-token-env", "GUARD_TOKEN"))
    assert cfg.auth_token == "xyz" and "xyz" not in repr(cfg)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        config_from_args(_args("--auth-token-file", str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="NOPE"):
        config_from_args(_args("--auth-token-env", "NOPE"))
    with pytest.raises(SystemExit):  # one source only
        _args("--auth-token-env", "A", "--auth-token-file", "f")


def test_tls_flags_go_together() -> None:
    with pytest.raises(ValueError, match="--tls-key"):
        config_from_args(_args("--tls-cert", "c.pem"))
    with pytest.raises(ValueError, match="--tls-client-ca"):
        config_from_args(_args("--tls-client-ca", "ca.pem"))
    tls = config_from_args(_args("--tls-cert", "c", "--tls-key", "k", "--tls-client-ca", "a")).tls
    assert tls is not None and tls.client_ca_file == Path("a")


def test_the_serve_command_imports_neither_torch_nor_calibrate() -> None:
    code = (
        "import sys\n"
        "from guard import cli\n"
        "cli.build_parser('serve').parse_args(['serve', 'x'])\n"
        "import guard.server, guard.serve_cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'calibrate')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_quarantine_keeps_the_newest_within_its_cap(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    q = Quarantine(QuarantineConfig(tmp_path, max_bytes=25_000), registry)
    for i in range(5):  # each file is a little over 10 kB
        q.submit(np.full((10_000,), i, np.uint8), {"request_id": f"r/{i}", "item": 0})
    q.close()
    files = sorted(tmp_path.glob("*.npz"))
    assert [int(np.load(f)["input"][0]) for f in files] == [3, 4]  # the oldest went first
    on_disk = sum(f.stat().st_size for f in files)
    assert on_disk <= 25_000
    assert registry.get_sample_value("guard_quarantined_total") == 5
    assert registry.get_sample_value("guard_quarantine_bytes") == on_disk
    assert all(f.name.count("-") == 3 and "r_" in f.name for f in files)  # a file-safe id
    Quarantine(QuarantineConfig(tmp_path, max_bytes=12_000), CollectorRegistry()).close()
    assert len(list(tmp_path.glob("*.npz"))) == 1  # a smaller cap trims what is there


def test_quarantine_drops_inputs_over_the_cap(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    q = Quarantine(QuarantineConfig(tmp_path, max_bytes=2_000), registry)
    q.submit(np.zeros(5_000, np.uint8), {})
    q.close()
    assert list(tmp_path.iterdir()) == []
    assert registry.get_sample_value("guard_quarantine_dropped_total", {"reason": "too_large"}) == 1


def test_quarantine_never_blocks_a_request_on_a_slow_disk(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    q = Quarantine(QuarantineConfig(tmp_path, max_pending=1), registry)
    release, writing = threading.Event(), threading.Event()
    write = q._write

    def slow_write(*args: Any) -> None:
        writing.set()
        release.wait(10)
        write(*args)

    q._write = slow_write  # type: ignore[method-assign]
    q.submit(np.zeros(10, np.uint8), {})  # taken by the writer, which then blocks
    assert writing.wait(10)
    q.submit(np.zeros(10, np.uint8), {})  # waits in the queue
    q.submit(np.zeros(10, np.uint8), {})  # no room: dropped at once
    release.set()
    q.close()
    assert (
        registry.get_sample_value("guard_quarantine_dropped_total", {"reason": "queue_full"}) == 1
    )
    assert registry.get_sample_value("guard_quarantined_total") == 2


def test_log_formats_carry_the_fields() -> None:
    record = logging.LogRecord("guard.flagged", logging.WARNING, __file__, 1, "flagged input",
                               None, None)  # fmt: skip
    record.fields = {"request_id": "r1", "p_value": 1e-9}
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "flagged input" and line["request_id"] == "r1"
    assert line["level"] == "WARNING" and line["logger"] == "guard.flagged"
    text = TextFormatter().format(record)
    assert text.endswith('{"p_value": 1e-09, "request_id": "r1"}') and "\n" not in text


def test_metric_helpers() -> None:
    import grpc

    assert batch_buckets(8) == (1.0, 2.0, 4.0, 8.0)
    assert batch_buckets(12) == (1.0, 2.0, 4.0, 8.0, 12.0)
    buckets = statistic_buckets(Null("gaussian", mu=1.0, sigma=2.0))
    assert buckets[0] == -3.0 and 1.0 + 2.576 * 2.0 in buckets and buckets == tuple(sorted(buckets))
    assert outcome(grpc.StatusCode.OK) == "success"
    assert outcome(grpc.StatusCode.INVALID_ARGUMENT) == "invalid"
    assert outcome(grpc.StatusCode.RESOURCE_EXHAUSTED) == "rejected"
    assert outcome(grpc.StatusCode.INTERNAL) == "error"
    assert usable_cpus() >= 1
