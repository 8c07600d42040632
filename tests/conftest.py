"""Fixtures shared by the serving tests: one artifact made by `mmguard calibrate` on the tiny
backdoored example, inputs from its data that the artifact flags or passes, the guard's engine on
it in this process, a throwaway PKI for the TLS tests, and per test module the server with the
default test configuration and a raw stub on it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

TINY = Path(__file__).resolve().parents[1] / "calibrate" / "examples" / "tiny"
ATTACK_TARGET = 0  # calibrate/examples/tiny/example.json


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """torch on one intra-op thread for a test module: the machine is shared with training jobs,
    and competing intra-op threads only contend (up to 10x slower)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def server(artifact_dir: Path) -> Iterator[Any]:
    """The real server on port 0 with tests.serving.serve_config's defaults (a ServerThread)."""
    from tests.serving import running, serve_config

    with running(serve_config(artifact_dir)) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server: Any) -> Iterator[Any]:
    """A raw GRPCInferenceService stub on `server`."""
    from tests.serving import raw_stub

    channel, raw = raw_stub(server.url)
    yield raw
    channel.close()


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An artifact written by `mmguard calibrate` (about 30-60 s, once per session)."""
    from guard.cli import main

    out = tmp_path_factory.mktemp("served") / "tiny"
    code = main(
        [
            "calibrate",
            "--factory", "calibrate.synthetic:small_cnn",
            "--weights", str(TINY / "model.pt"),
            "--data", str(TINY / "clean.npz"),
            "--out", str(out),
            "--quiet",
            "--mmbd-steps", "60",
        ]
    )  # fmt: skip
    assert code == 0
    return out


@dataclass(frozen=True)
class Samples:
    """FP32 NCHW pixels in [0, 1] (and the same images as UINT8) chosen with the artifact."""

    triggered: np.ndarray  # patched images the artifact flags and corrects away from the target
    triggered_u8: np.ndarray
    clean: np.ndarray  # clean images it passes unflagged with their true label
    clean_labels: np.ndarray


def _nchw(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


@pytest.fixture(scope="session")
def samples(artifact_dir: Path) -> Samples:
    from guard.artifact import load_artifact
    from guard.engine import GuardEngine

    engine = GuardEngine(load_artifact(artifact_dir), "cpu", threads=1)
    poisoned = _nchw(np.load(TINY / "poisoned.npz")["images"])
    d = engine.decide(poisoned.astype(np.float32) / 255)
    hit = np.flatnonzero(d.flagged & (d.label != ATTACK_TARGET) & (d.original_label == 0))[:4]
    assert len(hit) == 4, "the artifact should flag and correct the triggered examples"
    clean_npz = np.load(TINY / "clean.npz")
    clean = _nchw(clean_npz["images"])
    c = engine.decide(clean.astype(np.float32) / 255)
    ok = np.flatnonzero(~c.flagged & (c.original_label == clean_npz["labels"]))[:4]
    assert len(ok) == 4
    return Samples(
        triggered=poisoned[hit].astype(np.float32) / 255,
        triggered_u8=poisoned[hit],
        clean=clean[ok].astype(np.float32) / 255,
        clean_labels=clean_npz["labels"][ok],
    )


@pytest.fixture(scope="session")
def engine(artifact_dir: Path) -> Any:
    """guard.engine.GuardEngine on the session artifact in this process: the reference the
    server's answers are checked against (benchmarks.reliability.answers)."""
    from guard.artifact import load_artifact
    from guard.engine import GuardEngine

    return GuardEngine(load_artifact(artifact_dir), "cpu", threads=1)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A CA with a server and a client certificate, and a client certificate of another CA
    (tests.certs.Pem values)."""
    from tests.certs import CertificateAuthority

    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(root, "guard-ca")
    rogue = CertificateAuthority(root, "rogue-ca")
    return {
        "ca": ca.pem,
        "server": ca.issue("server", server=True),
        "client": ca.issue("client", server=False),
        "rogue_client": rogue.issue("rogue-client", server=False),
    }
