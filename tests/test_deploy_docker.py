"""The Dockerfiles and compose files of deploy/, read statically (no container engine here):
serving images install no torch and run as a non-root user with a health check; the CPU image's
requirements are pyproject's serving dependencies; the GPU base image's CUDA matches
onnxruntime-gpu's; every flag and file the compose files name exists; and the health-check
script answers 0 for a SERVING guard and 1 otherwise."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from guard.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "deploy" / "docker"
SERVING = ("cpu.Dockerfile", "gpu.Dockerfile")
IMAGES = (*SERVING, "calibrate.Dockerfile")


def _instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage(name: str) -> list[tuple[str, str]]:
    steps = _instructions(name)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def _exec_form(args: str) -> list[str]:
    import json

    value = json.loads(args)
    assert isinstance(value, list), args
    return [str(v) for v in value]


@pytest.mark.parametrize("name", IMAGES)
def test_images_run_as_a_non_root_user(name: str) -> None:
    users = [rest for word, rest in _final_stage(name) if word == "USER"]
    assert users, f"{name} runs as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users
    assert user.isdigit()  # numeric, so Kubernetes' runAsNonRoot can verify it


@pytest.mark.parametrize("name", SERVING)
def test_serving_images_have_a_grpc_health_check(name: str) -> None:
    (check,) = [rest for word, rest in _final_stage(name) if word == "HEALTHCHECK"]
    assert "--start-period=" in check  # the warm-up
    command = check.split("CMD", 1)[1].strip()
    assert _exec_form(command)[-1] == "/opt/mmguard/healthcheck.py"
    copies = [rest for word, rest in _final_stage(name) if word == "COPY"]
    assert "deploy/docker/healthcheck.py /opt/mmguard/healthcheck.py" in copies


@pytest.mark.parametrize("name", SERVING)
def test_serving_images_install_no_torch(name: str) -> None:
    runs = [rest for word, rest in _instructions(name) if word == "RUN"]
    installs = [i.strip() for run in runs for i in re.findall(r"pip install ([^&;]+)", run)]
    assert installs, name
    for args in installs:
        assert "torch" not in args and "calibrate" not in args and "[" not in args, args
        if args.startswith("-r "):  # a requirements file copied into the image
            reqs = (ROOT / "deploy" / "docker" / Path(args.split()[1]).name).read_text()
            assert "torch" not in reqs
    assert installs[-1] in (".", "--no-deps ."), installs  # the package, without extras
    text = (DOCKER / name).read_text()
    assert "find_spec('torch') is not None" in text  # the build fails if torch came along


@pytest.mark.parametrize("name", SERVING)
def test_serving_images_start_the_guard_with_valid_flags(name: str) -> None:
    steps = dict(_final_stage(name))
    assert _exec_form(steps["ENTRYPOINT"]) == ["mmguard"]
    args = build_parser("serve").parse_args(_exec_form(steps["CMD"]))
    assert (args.port, args.metrics_port) == (8001, 8002)
    assert steps["EXPOSE"].split() == ["8001", "8002"]
    assert args.device == ("cuda" if name.startswith("gpu") else "cpu")


def _serving_dependencies() -> dict[str, Requirement]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    return {r.name: r for r in reqs}


def test_cpu_requirements_are_pyprojects_with_the_cpu_onnxruntime() -> None:
    lines = (DOCKER / "requirements-cpu.txt").read_text().splitlines()
    cpu = {r.name: r for r in (Requirement(x) for x in lines if x and not x.startswith("#"))}
    deps = _serving_dependencies()
    assert "onnxruntime-gpu" in deps and "onnxruntime-gpu" not in cpu
    assert cpu["onnxruntime"].specifier == deps["onnxruntime"].specifier
    for name, req in deps.items():
        if not name.startswith("onnxruntime"):
            assert cpu[name].specifier == req.specifier, name
    assert set(cpu) == {n for n in deps if n != "onnxruntime-gpu"}
    assert "--no-deps ." in " ".join(rest for w, rest in _instructions("cpu.Dockerfile"))


def test_gpu_base_image_matches_onnxruntime_gpus_cuda() -> None:
    (arg,) = [rest for word, rest in _instructions("gpu.Dockerfile")
              if word == "ARG" and rest.startswith("CUDA_IMAGE=")]  # fmt: skip
    found = re.fullmatch(r"CUDA_IMAGE=nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-\S+", arg)
    assert found, arg
    try:
        requires = metadata.requires("onnxruntime-gpu") or []
    except metadata.PackageNotFoundError:
        pytest.skip("onnxruntime-gpu is not installed here")
    cuda = [Requirement(r) for r in requires if r.startswith("nvidia-cuda-runtime")]
    if not cuda:
        pytest.skip("this onnxruntime-gpu names no CUDA runtime")
    major = str(cuda[0].specifier).lstrip("~=<>!").split(".")[0]
    assert found.group(1) == major, f"onnxruntime-gpu needs CUDA {major}"


def test_compose_files_parse_and_reference_what_exists() -> None:
    deploy = ROOT / "deploy"
    compose = yaml.safe_load((deploy / "compose.yaml").read_text())
    gpu = yaml.safe_load((deploy / "compose.gpu.yaml").read_text())
    services = compose["services"]
    assert {"calibrate", "guard", "prometheus", "grafana"} <= set(services)
    for svc in [*services.values(), *gpu["services"].values()]:
        if "build" in svc:
            context = (deploy / svc["build"]["context"]).resolve()
            assert context == ROOT
            assert (context / svc["build"]["dockerfile"]).is_file()
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (deploy / source).exists(), volume
            else:
                assert source in compose["volumes"], volume
    # calibration: one-shot, and the guard starts only after it succeeded
    assert services["calibrate"]["restart"] == "no"
    depends = services["guard"]["depends_on"]["calibrate"]
    assert depends["condition"] == "service_completed_successfully"
    assert "--out" in services["calibrate"]["command"][0]
    for svc in (services["guard"], gpu["services"]["guard"]):
        command = [c.replace("${MMGUARD_MODEL:-tiny-demo}", "tiny-demo") for c in svc["command"]]
        args = build_parser("serve").parse_args(command)
        assert args.shutdown_grace_s < 20  # stop_grace_period
    assert gpu["services"]["guard"]["deploy"]["resources"]["reservations"]["devices"]
    prometheus = yaml.safe_load((deploy / "prometheus" / "prometheus.yml").read_text())
    target = prometheus["scrape_configs"][0]["static_configs"][0]["targets"][0]
    assert target == f"guard:{args.metrics_port}"


def test_the_compose_calibration_script_is_valid_shell() -> None:
    script = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"][
        "calibrate"
    ]["command"][0]
    done = subprocess.run(["sh", "-n"], input=script.replace("$$", "$"), text=True,
                          capture_output=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    calibrate = script.split("exec ", 1)[1].replace("\\\n", " ").replace("$${MMGUARD_MODEL}", "m")
    argv = shlex.split(calibrate)
    assert argv[:2] == ["mmguard", "calibrate"]
    args = build_parser("calibrate").parse_args(argv[1:])
    tiny = ROOT / "calibrate" / "examples" / "tiny"
    copies = " ".join(r for w, r in _instructions("calibrate.Dockerfile") if w == "COPY")
    assert "calibrate/examples/tiny /opt/mmguard/examples/tiny" in copies
    for path in (args.weights, args.data):
        assert (tiny / Path(path).name).is_file(), path


@pytest.mark.slow
def test_the_health_check_script(artifact_dir: Path) -> None:
    """0 while a real guard is SERVING, 1 once nothing listens (as Docker reads it)."""
    from tests.serving import running, serve_config

    script = str(DOCKER / "healthcheck.py")

    def check(address: str) -> subprocess.CompletedProcess[str]:
        env = {"MMGUARD_HEALTH_ADDRESS": address, "PATH": "/usr/bin:/bin"}
        return subprocess.run(["nice", "-n", "19", sys.executable, script], env=env,
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip

    with running(serve_config(artifact_dir)) as srv:
        done = check(srv.url)
        assert done.returncode == 0, done.stdout + done.stderr
        url = srv.url
    done = check(url)
    assert done.returncode == 1 and "failed" in done.stderr, done.stdout + done.stderr
