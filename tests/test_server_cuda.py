"""The CUDA path, on a machine with a GPU (skipped elsewhere, where test_server_errors checks that
`--device cuda` fails fast): the server really runs both networks on CUDAExecutionProvider, says
so in guard_build_info and in its log, and its answers through stock tritonclient match the CPU
engine's on the same inputs."""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc

from guard.config import BatchingConfig
from guard.engine import CUDA, GuardEngine
from guard.process import GuardProcess
from tests.conftest import ATTACK_TARGET, Samples
from tests.serving import running, serve_config

pytestmark = pytest.mark.slow


def _cuda_usable() -> bool:
    if not Path("/dev/nvidiactl").exists():
        return False
    import onnxruntime as ort

    return CUDA in ort.get_available_providers()


requires_gpu = pytest.mark.skipif(not _cuda_usable(), reason="no GPU usable by onnxruntime")


def _infer(client: tc.InferenceServerClient, x: np.ndarray) -> tc.InferResult:
    inp = tc.InferInput("input", list(x.shape), "UINT8" if x.dtype == np.uint8 else "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("tiny", [inp], client_timeout=60)


@requires_gpu
def test_engine_runs_both_networks_on_the_gpu(artifact_dir: Path, samples: Samples) -> None:
    from guard.artifact import load_artifact

    art = load_artifact(artifact_dir)
    gpu = GuardEngine(art, "cuda")
    cpu = GuardEngine(art, "cpu", threads=1)
    assert gpu.device == "cuda" and gpu.providers[0] == CUDA
    assert all(s.get_providers()[0] == CUDA for s in gpu._sessions)
    # full FP32 on the GPU, as on the CPU and in calibration (TF32 is onnxruntime's default)
    assert all(s.get_provider_options()[CUDA]["use_tf32"] == "0" for s in gpu._sessions)
    x = np.concatenate([samples.triggered, samples.clean])
    (go, gb, *_), (co, cb, *_) = gpu.logits(x), cpu.logits(x)
    np.testing.assert_allclose(go, co, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(gb, cb, rtol=1e-3, atol=1e-3)
    g, c = gpu.decide(x), cpu.decide(x)
    assert g.label.tolist() == c.label.tolist() and g.flagged.tolist() == c.flagged.tolist()
    small = gpu.logits(x[:3])  # run padded to the 8 already seen, then sliced back
    assert gpu._cuda_batch == len(x) and small[0].shape == (3, co.shape[1])
    np.testing.assert_allclose(small[0], co[:3], rtol=1e-3, atol=1e-3)


def test_cuda_padding_leaves_the_answers_unchanged(artifact_dir: Path, samples: Samples) -> None:
    """The padding logic, run on the CPU provider: a smaller batch after a larger one is padded
    with zero images to the larger size, and the answers are those of the unpadded batch."""
    from guard.artifact import load_artifact

    art = load_artifact(artifact_dir)
    plain = GuardEngine(art, "cpu", threads=1)
    padded = GuardEngine(art, "cpu", threads=1)
    padded.device = "cuda"  # the padding path, on onnxruntime's CPU provider
    x = np.concatenate([samples.triggered, samples.clean])
    padded.logits(x)
    assert padded._feed(x[:2])[art.input.name].shape[0] == len(x)
    for n in (1, 3, len(x)):
        (po, pb, *_), (qo, qb, *_) = padded.logits(x[:n]), plain.logits(x[:n])
        assert po.shape == qo.shape == (n, qo.shape[1])
        np.testing.assert_allclose(po, qo, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(pb, qb, rtol=1e-5, atol=1e-5)
    assert padded.original_logits(x[:1]).shape == (1, qo.shape[1])


@requires_gpu
def test_server_on_cuda_flags_and_corrects_like_the_cpu(
    artifact_dir: Path, samples: Samples, engine: GuardEngine
) -> None:
    batching = BatchingConfig(max_batch_size=8, max_queue_delay_ms=2.0, warmup_batch_sizes=(1, 8))
    with running(serve_config(artifact_dir, device="cuda", batching=batching)) as srv:
        info = next(m for m in srv.registry.collect() if m.name == "guard_build_info").samples[0]
        assert info.labels["provider"] == CUDA
        client = tc.InferenceServerClient(srv.url)
        trig = _infer(client, samples.triggered)
        clean = _infer(client, samples.clean)
        u8 = _infer(client, samples.triggered_u8)
        # concurrent single-image requests merge into batches on the GPU too
        singles = [samples.clean[i : i + 1] for i in range(len(samples.clean))] * 8
        with cf.ThreadPoolExecutor(16) as pool:
            merged = list(pool.map(lambda x: _infer(client, x), singles))
        client.close()
        batches = srv.sample("guard_batch_size_count")
    assert trig.as_numpy("flagged").all()
    assert (trig.as_numpy("label") != ATTACK_TARGET).all()
    assert trig.as_numpy("original_label").tolist() == [ATTACK_TARGET] * len(samples.triggered)
    assert not clean.as_numpy("flagged").any()
    assert clean.as_numpy("label").tolist() == samples.clean_labels.tolist()
    assert u8.as_numpy("label").tolist() == trig.as_numpy("label").tolist()
    ref = engine.decide(samples.triggered)
    assert trig.as_numpy("label").tolist() == ref.label.tolist()
    np.testing.assert_allclose(trig.as_numpy("statistic"), ref.statistic, rtol=1e-3, atol=1e-3)
    assert [r.as_numpy("label")[0] for r in merged] == samples.clean_labels.tolist() * 8
    assert batches < 3 + len(singles)  # fewer batches than requests: some merged


@requires_gpu
def test_mmguard_serve_reports_the_cuda_provider(artifact_dir: Path) -> None:
    with GuardProcess(artifact_dir, "enforce", ["--device", "cuda"]) as srv:
        srv.wait_serving()
        provider = srv.build_info()["provider"]
        log = "".join(srv.log)
    assert provider == CUDA
    assert CUDA in log
