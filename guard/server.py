"""Assemble and run the gRPC server: artifact and engine, data plane, interceptors, health,
reflection, TLS, metrics endpoint, warm-up and graceful stop.

    server, port = await create_server(config, registry=CollectorRegistry())
    await server.start()        # listening at once; SERVING after the warm-up
    await server.stop()         # NOT_SERVING, in-flight requests finish within the grace period
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import CollectorRegistry

from guard._proto import grpc_predict_v2_pb2 as pb
from guard._proto import grpc_predict_v2_pb2_grpc as pb_grpc
from guard.artifact import Artifact, ArtifactError, load_artifact
from guard.config import Device, ServeConfig, TlsConfig
from guard.dataplane import DataPlane, Engine, server_version
from guard.health import HealthService
from guard.interceptors import AuthInterceptor, CallTracker, StatusInterceptor
from guard.metrics import GuardMetrics
from guard.metrics_http import start_metrics_server
from guard.quarantine import Quarantine
from guard.servicer import SERVICE_NAME, InferenceServicer

if TYPE_CHECKING:
    from guard.signing import TrustedKey

log = logging.getLogger("guard.server")
EngineFactory = Callable[..., Engine]  # (artifact, device, threads[, original_only=True])
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# The shutdown's lame-duck phase (see GuardServer.stop) ends once no call has reached the server
# for QUIET_S, or LAME_DUCK_MAX_S after the last running call finished, whichever comes first.
QUIET_S = 0.1
LAME_DUCK_MAX_S = 1.0


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota visible: the affinity mask is the limit
    return cpus


def default_engine(
    artifact: Artifact, device: Device, threads: int, original_only: bool = False
) -> Engine:
    from guard.engine import GuardEngine

    return GuardEngine(artifact, device, threads, original_only=original_only)


def _credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    pair = (tls.key_file.read_bytes(), tls.cert_file.read_bytes())
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=bool(ca))


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """The served services' descriptors, in a pool of their own (see scripts/gen_proto.py)."""
    pool = descriptor_pool.DescriptorPool()
    for fd in (pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        pool.Add(proto)
    return pool


class GuardServer:
    """A bound, not yet started server and everything it owns."""

    def __init__(
        self,
        grpc_server: grpc.aio.Server,
        dataplane: DataPlane,
        *,
        config: ServeConfig,
        health_servicer: HealthService,
        registry: CollectorRegistry,
        executor: ThreadPoolExecutor,
        quarantine: Quarantine | None,
        calls: CallTracker,
    ) -> None:
        self.grpc_server = grpc_server
        self.calls = calls
        self.dataplane = dataplane
        self.config = config
        self.health = health_servicer
        self.registry = registry
        self._executor = executor
        self._quarantine = quarantine
        self._metrics_http: Any = None
        self.metrics_port: int | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        """Listen (live, NOT_SERVING), warm up, then report ready and SERVING."""
        await self.grpc_server.start()
        if self.config.metrics_port is not None:
            address = f"{self.config.host}:{self.config.metrics_port}"
            try:
                self._metrics_http, _ = start_metrics_server(
                    self.config.metrics_port, self.config.host, self.registry
                )
            except OSError as exc:  # e.g. the port is taken: say which one, and what for
                raise OSError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
            self.metrics_port = int(self._metrics_http.server_port)
            log.info("metrics on http://%s:%d/metrics", self.config.host, self.metrics_port)
        start = time.perf_counter()
        sizes = self.config.batching.warmup_sizes
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.dataplane.warm_up)
        log.info("warm-up at batch sizes %s took %.2f s", list(sizes), time.perf_counter() - start)
        self.dataplane.set_ready(True)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("ready: model %r", self.dataplane.model_name)

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING at once; in-flight requests get `grace_s` (default: the configured
        shutdown grace) to finish, then the rest is cancelled and everything is released.
        Requests that arrive meanwhile are refused with UNAVAILABLE (see `_lame_duck`)."""
        if self._stopped.is_set():
            return
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        log.info("shutting down (grace %.1f s)", grace)
        await self.health.enter_graceful_shutdown()
        self.dataplane.set_ready(False)
        await self._lame_duck(deadline)
        await self.grpc_server.stop(max(0.0, deadline - time.monotonic()))
        await self.dataplane.batcher.close(timeout_s=0)
        if self._quarantine is not None:
            self._quarantine.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._stopped.set()
        log.info("stopped")

    async def _lame_duck(self, deadline: float) -> None:
        """Keep taking calls until the running ones are done and no new one has come for
        QUIET_S (LAME_DUCK_MAX_S at most once none runs; never past `deadline`). The server is
        not ready, so the data plane answers new inference calls UNAVAILABLE: a client retries
        elsewhere. gRPC's own stop would instead cancel the calls it has received but not yet
        passed on to the application, and their clients would see CANCELLED, a status that does
        not say the request is safe to send again."""
        start = time.monotonic()  # calls may be waiting inside gRPC already: wait QUIET_S
        idle_since: float | None = None
        while (now := time.monotonic()) < deadline:
            if self.calls.running > 0:
                idle_since = None
            else:
                idle_since = now if idle_since is None else idle_since
                quiet_since = max(start, self.calls.last_arrival)
                if now - quiet_since >= QUIET_S or now - idle_since >= LAME_DUCK_MAX_S:
                    return
            await asyncio.sleep(0.01)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _grpc_server(config: ServeConfig, metrics: GuardMetrics, calls: CallTracker) -> grpc.aio.Server:
    interceptors: list[grpc.aio.ServerInterceptor] = [calls, StatusInterceptor(metrics)]
    if config.auth_token is not None:
        interceptors.append(AuthInterceptor(config.auth_token))
    return grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
        ],
    )


def _bind(server: grpc.aio.Server, config: ServeConfig) -> int:
    address = f"{config.host}:{config.port}"
    try:
        if config.tls is not None:
            port = server.add_secure_port(address, _credentials(config.tls))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return port


def _build_metrics(
    config: ServeConfig, artifact: Artifact, engine: Engine, registry: CollectorRegistry
) -> GuardMetrics:
    metrics = GuardMetrics(
        registry,
        class_names=artifact.class_names,
        null=artifact.null,
        max_batch_size=config.batching.max_batch_size,
    )
    files = artifact.manifest["files"]
    metrics.set_build_info(
        version=server_version(),
        provider=engine.providers[0],
        model=config.model_name or artifact.name,
        model_sha256=str(files["original"]["sha256"]),
        bounded_sha256=str(files["bounded"]["sha256"]),
        start_sha256=str(files["start"]["sha256"]) if "start" in files else "",
        mode=config.mode,
    )
    return metrics


async def _add_services(server: grpc.aio.Server, dataplane: DataPlane) -> HealthService:
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(dataplane), server)
    health_servicer = HealthService()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server, pool=_reflection_pool())
    return health_servicer


def _trusted_keys(paths: tuple[Path, ...]) -> list[TrustedKey]:
    """The trusted public keys (none: signatures are not checked); a bad key file is an
    ArtifactError naming it."""
    if not paths:
        return []
    from guard.signing import SigningError, load_trusted_keys

    try:
        return load_trusted_keys(paths)
    except SigningError as exc:
        raise ArtifactError(f"--trusted-key: {exc}") from None


async def create_server(
    config: ServeConfig,
    *,
    registry: CollectorRegistry,
    engine_factory: EngineFactory = default_engine,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[GuardServer, int]:
    """Verify the artifact, load both networks and bind the port (call it in a running event
    loop). Raises ArtifactError, EngineError or OSError (a file, the address) naming the problem."""
    artifact = load_artifact(config.artifact_dir, trusted_keys=_trusted_keys(config.trusted_keys))
    if artifact.signed_by is not None:
        log.info("manifest signature verified: trusted key %s", artifact.signed_by)
    threads = config.threads or usable_cpus()
    if config.mode == "unguarded":  # the original network alone, as the baseline it stands for
        engine = engine_factory(artifact, config.device, threads, original_only=True)
    else:
        engine = engine_factory(artifact, config.device, threads)
    log.info("onnxruntime providers in use: %s (%d threads)", engine.providers, threads)
    if config.mode == "unguarded":
        log.warning(
            "mode unguarded: NO backdoor protection, the original network alone answers and "
            "nothing is ever flagged (a baseline for benchmarks, not for production)"
        )
    metrics = _build_metrics(config, artifact, engine, registry)
    quarantine = Quarantine(config.quarantine, registry) if config.quarantine else None
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guard-inference")
    try:
        dataplane = DataPlane(
            artifact=artifact,
            engine=engine,
            config=config,
            metrics=metrics,
            executor=executor,
            quarantine=quarantine,
            clock=clock,
        )
        calls = CallTracker()
        server = _grpc_server(config, metrics, calls)
        health_servicer = await _add_services(server, dataplane)
        port = _bind(server, config)
    except BaseException:
        executor.shutdown(wait=False)
        if quarantine is not None:
            quarantine.close()
        raise
    guard_server = GuardServer(
        server,
        dataplane,
        config=config,
        health_servicer=health_servicer,
        registry=registry,
        executor=executor,
        quarantine=quarantine,
        calls=calls,
    )
    return guard_server, port
