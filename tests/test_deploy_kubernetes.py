"""The Kubernetes manifests of deploy/kubernetes: the built-in kinds validate offline against
the Kubernetes JSON schemas (kubernetes-validate, strict: unknown fields fail); the custom
resources (ServiceMonitor, KServe ServingRuntime and InferenceService) get a hand-written field
check, their containers the core Container schema; and the pieces fit together (selectors,
port names, probes, claims, the guard's and the calibration's own flags)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from guard.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S = DEPLOY / "kubernetes"
# the oldest version these manifests need (gRPC probes, PDB unhealthyPodEvictionPolicy GA in
# 1.31) and the newest the schemas know
VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
CUSTOM_GROUPS = ("monitoring.coreos.com/", "serving.kserve.io/")


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((str(path.relative_to(K8S)), doc))
    return docs


DOCS = _documents()


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in DOCS if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def _validate(doc: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} ({version}): {exc.message} "
                    f"at {'.'.join(map(str, exc.path))}")  # fmt: skip


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("path", "doc"),
    [(p, d) for p, d in DOCS if not d["apiVersion"].startswith(CUSTOM_GROUPS)],
    ids=lambda v: v if isinstance(v, str) else v["kind"],
)
def test_builtin_kinds_validate_against_the_schemas(
    path: str, doc: dict[str, Any], version: str
) -> None:
    _validate(doc, version)


def test_the_validation_is_strict() -> None:
    doc = copy.deepcopy(_one("Deployment"))
    doc["spec"]["replica"] = 2  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, VERSIONS[0], strict=True)


def test_every_kind_the_issue_asks_for_is_there() -> None:
    kinds = {d["kind"] for _, d in DOCS}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "ServiceMonitor", "Job", "ServingRuntime", "InferenceService"} <= kinds  # fmt: skip


def _container_schema_check(container: dict[str, Any]) -> None:
    """A container of a custom resource, checked against the core Container schema."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"},
           "spec": {"containers": [container]}}  # fmt: skip
    for version in VERSIONS:
        _validate(pod, version)


def _serve_args(args: list[str]) -> Any:
    """The guard's own parser accepts the arguments (a bad flag exits)."""
    return build_parser("serve").parse_args(args)


def test_the_deployment_serves_gpu_grpc_with_health_probes_and_a_drain() -> None:
    deployment = _one("Deployment")
    spec = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    (guard,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in guard["ports"]}
    args = _serve_args(guard["args"])
    assert ports == {"h2c": args.port, "metrics": args.metrics_port}
    assert args.device == "cuda"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert guard[probe]["grpc"]["port"] == ports["h2c"], probe  # grpc.health.v1
    assert guard["readinessProbe"]["grpc"]["service"] == "inference.GRPCInferenceService"
    drain_s = float(guard["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > drain_s + args.shutdown_grace_s
    assert guard["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert guard["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert guard["resources"]["requests"]["cpu"] and guard["resources"]["limits"]["memory"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert guard["securityContext"]["allowPrivilegeEscalation"] is False
    assert guard["securityContext"]["readOnlyRootFilesystem"] is True
    assert guard["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_services_name_the_grpc_port_h2c_and_select_the_pods() -> None:
    pod_labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    (guard,) = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    container_ports = {p["name"] for p in guard["ports"]}
    services = [d for _, d in DOCS if d["kind"] == "Service"]
    assert services
    for service in services:
        assert service["spec"]["selector"].items() <= pod_labels.items()
        names = {p["name"]: p for p in service["spec"]["ports"]}
        assert names["h2c"]["port"] == 8001 and names["h2c"]["targetPort"] == "h2c"
        assert {p["targetPort"] for p in names.values()} <= container_ports


def test_hpa_pdb_and_servicemonitor_point_at_the_guard() -> None:
    deployment = _one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpa = _one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}  # fmt: skip
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"  # a custom metric, through the custom metrics API
    assert metric["pods"]["metric"]["name"].startswith("guard_")
    assert hpa["minReplicas"] >= 2  # with the PDB, a drain never empties the service
    pdb = _one("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["minAvailable"] < hpa["minReplicas"]


def test_servicemonitor_fields() -> None:
    """Hand-written check of monitoring.coreos.com/v1 ServiceMonitor fields (no CRD schema is
    available offline)."""
    monitor = _one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel",
                         "targetLabels", "podTargetLabels", "sampleLimit"}  # fmt: skip
    selected = [
        s for _, s in DOCS
        if s["kind"] == "Service"
        and spec["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]  # fmt: skip
    assert [s["metadata"]["name"] for s in selected] == ["mmguard"]  # job="mmguard", once
    ports = {p["name"] for p in selected[0]["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout",
                                 "relabelings", "metricRelabelings", "honorLabels"}  # fmt: skip
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics"


def _claims() -> set[str]:
    return {d["metadata"]["name"] for _, d in DOCS if d["kind"] == "PersistentVolumeClaim"}


def test_the_calibration_job_writes_a_new_artifact_directory() -> None:
    job = _one("Job")["spec"]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and job["backoffLimit"] == 0
    (container,) = pod["containers"]
    args = build_parser("calibrate").parse_args(["calibrate", *container["args"]])
    assert not args.force  # a new directory per calibration, never overwritten
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert str(args.out).startswith("/artifacts/") and mounts["/artifacts"] == "artifacts"
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in pod["volumes"] if "persistentVolumeClaim" in v}  # fmt: skip
    assert set(claims.values()) <= _claims()
    deployment_pod = _one("Deployment")["spec"]["template"]["spec"]
    served = {v["persistentVolumeClaim"]["claimName"]
              for v in deployment_pod["volumes"] if "persistentVolumeClaim" in v}  # fmt: skip
    assert served == {claims["artifacts"]}  # the guard reads what the Job writes
    assert pod["securityContext"]["runAsNonRoot"] is True


SERVING_RUNTIME_SPEC = {
    "supportedModelFormats", "protocolVersions", "multiModel", "containers", "disabled",
    "grpcEndpoint", "grpcDataEndpoint", "httpDataEndpoint", "replicas", "storageHelper",
    "builtInAdapter", "nodeSelector", "tolerations", "affinity", "volumes", "labels",
    "annotations", "imagePullSecrets", "workerSpec",
}  # fmt: skip
PREDICTOR_SPEC = {
    "model", "minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "containerConcurrency",
    "timeout", "canaryTrafficPercent", "serviceAccountName", "nodeSelector", "tolerations",
    "affinity", "volumes", "labels", "annotations", "imagePullSecrets", "deploymentStrategy",
}  # fmt: skip
MODEL_SPEC_KSERVE = {"modelFormat", "runtime", "protocolVersion", "storageUri"}


def test_kserve_serving_runtime_fields() -> None:
    """Hand-written check of KServe v1alpha1 ServingRuntime fields (no CRD schema offline);
    its container against the core Container schema."""
    runtime = _one("ServingRuntime")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = runtime["spec"]
    assert set(spec) <= SERVING_RUNTIME_SPEC
    for fmt in spec["supportedModelFormats"]:
        assert set(fmt) <= {"name", "version", "autoSelect", "priority"} and fmt["name"]
    assert set(spec["protocolVersions"]) <= {"v1", "v2", "grpc-v1", "grpc-v2"}
    assert {"v2", "grpc-v2"} <= set(spec["protocolVersions"])
    assert spec["multiModel"] is False
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"
    assert [p["name"] for p in container["ports"]] == ["h2c"]  # KServe exposes one port
    _container_schema_check(container)
    args = _serve_args([a.replace("{{.Name}}", "my-model") for a in container["args"]])
    assert str(args.artifact_dir) == "/mnt/models"  # where the storage initializer puts it
    assert container["ports"][0]["containerPort"] == args.port
    assert runtime["metadata"]["annotations"]["prometheus.kserve.io/port"] == str(args.metrics_port)
    assert (
        container["image"]
        == _one("Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    )  # the same image as the Deployment


def test_kserve_inference_service_fields() -> None:
    """Hand-written check of KServe v1beta1 InferenceService fields, against the runtime."""
    isvc = _one("InferenceService")
    runtime = _one("ServingRuntime")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    predictor = isvc["spec"]["predictor"]
    assert set(isvc["spec"]) <= {"predictor", "transformer", "explainer"}
    assert set(predictor) <= PREDICTOR_SPEC
    assert predictor.get("scaleMetric", "concurrency") in ("cpu", "memory", "concurrency", "rps")
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["protocolVersion"] == "grpc-v2"
    scheme, _, rest = model["storageUri"].partition("://")
    assert scheme in ("pvc", "s3", "gs", "https", "hdfs", "webhdfs", "oci")
    if scheme == "pvc":
        assert rest.split("/")[0] in _claims()
    # the rest of `model` is a core Container (resources and the like)
    container = {k: v for k, v in model.items() if k not in MODEL_SPEC_KSERVE}
    _container_schema_check({"name": "kserve-container", **container})
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
