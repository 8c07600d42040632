"""Configuration of `mmguard serve`, built once from the command line (guard.serve_cli) or by a
test, validated here and passed down explicitly. Nothing reads flags or the environment later."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from guard.mmdf import DecisionRule

Device = Literal["auto", "cpu", "cuda"]
Mode = Literal["enforce", "shadow", "unguarded"]
MiB = 1 << 20


@dataclass(frozen=True)
class BatchingConfig:
    # items (not requests) per inference call; a single request may carry up to this many
    max_batch_size: int = 32
    # how long the first request of a batch waits for others to join it
    max_queue_delay_ms: float = 2.0
    # requests waiting for a batch; one more is answered RESOURCE_EXHAUSTED
    max_queue_size: int = 256
    # batch sizes run once before the server reports ready; empty: every size 1..max_batch_size
    warmup_batch_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if not self.max_queue_delay_ms >= 0:
            raise ValueError(f"max_queue_delay_ms must be >= 0, got {self.max_queue_delay_ms}")
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {self.max_queue_size}")
        for size in self.warmup_batch_sizes:
            if not 1 <= size <= self.max_batch_size:
                raise ValueError(
                    f"warm-up batch size {size} is outside 1..max_batch_size "
                    f"({self.max_batch_size})"
                )

    @property
    def warmup_sizes(self) -> tuple[int, ...]:
        sizes = self.warmup_batch_sizes or range(1, self.max_batch_size + 1)
        return tuple(sorted(set(sizes)))


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path  # PEM server certificate chain
    key_file: Path  # PEM private key of the server certificate
    # PEM CA bundle; set: mutual TLS, every client must present a certificate signed by it
    client_ca_file: Path | None = None


@dataclass(frozen=True)
class QuarantineConfig:
    directory: Path  # where flagged inputs are kept for review
    max_bytes: int = 256 * MiB  # total size kept; the oldest files are removed first
    max_pending: int = 64  # flagged inputs waiting to be written; more are dropped and counted

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"quarantine max_bytes must be >= 1, got {self.max_bytes}")
        if self.max_pending < 1:
            raise ValueError(f"quarantine max_pending must be >= 1, got {self.max_pending}")


@dataclass(frozen=True)
class ServeConfig:
    artifact_dir: Path  # a directory written by `mmguard calibrate`
    host: str = "0.0.0.0"  # address the gRPC and metrics servers bind
    port: int = 8001  # gRPC port (Triton's default); 0 picks a free one
    metrics_port: int | None = 8002  # Prometheus /metrics; None: none served; 0: a free one
    device: Device = "auto"  # cuda: fail unless onnxruntime runs on a GPU
    threads: int = 0  # onnxruntime intra-op threads; 0: the CPUs this process may use
    model_name: str | None = None  # name clients address; None: the artifact's name
    model_version: str = "1"  # the one version served; requests may also leave it empty
    alpha: float | None = None  # flag when p < alpha; None: the manifest's value
    flag_on_disagreement: bool | None = None  # None: the manifest's value
    # shadow: answer the original label, still flag, log and count. unguarded: a benchmark
    # baseline with NO protection, the original network alone (see guard.dataplane.unguarded)
    mode: Mode = "enforce"
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    shutdown_grace_s: float = 10.0  # in-flight requests get this long after SIGTERM/SIGINT
    tls: TlsConfig | None = None
    auth_token: str | None = field(default=None, repr=False)  # bearer token; None: no auth
    max_message_bytes: int = 64 * MiB  # largest request or response message
    quarantine: QuarantineConfig | None = None
    # PEM Ed25519 public keys: when any is given, the artifact's manifest must be signed by one
    trusted_keys: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "artifact_dir", Path(self.artifact_dir))
        object.__setattr__(self, "trusted_keys", tuple(Path(p) for p in self.trusted_keys))
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.mode not in ("enforce", "shadow", "unguarded"):
            raise ValueError(f"mode must be enforce, shadow or unguarded, got {self.mode!r}")
        for name, port in (("port", self.port), ("metrics_port", self.metrics_port)):
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name} must be in 0..65535, got {port}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.alpha is not None and not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not self.shutdown_grace_s >= 0:
            raise ValueError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.auth_token is not None and not self.auth_token.strip():
            raise ValueError("auth token is empty")
        if self.model_name is not None and not self.model_name:
            raise ValueError("model_name must not be empty")

    def decision_rule(self, manifest_rule: DecisionRule) -> DecisionRule:
        """The manifest's rule with this configuration's overrides applied."""
        rule = manifest_rule
        if self.alpha is not None:
            rule = replace(rule, alpha=self.alpha)
        if self.flag_on_disagreement is not None:
            rule = replace(rule, flag_on_disagreement=self.flag_on_disagreement)
        return rule
