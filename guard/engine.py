"""An artifact's networks in onnxruntime (original, bounded, and the start detector's when the
artifact has one), and the MMDF decision over their outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from guard.artifact import Artifact
from guard.mmdf import Decisions, decide

Device = Literal["auto", "cpu", "cuda"]
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class Outputs(NamedTuple):
    """What the networks return for one batch."""

    original: np.ndarray  # [N, K] logits
    bounded: np.ndarray  # [N, K]
    start: np.ndarray | None  # [N, K], with a start detector
    ratios: np.ndarray | None  # [N, S]: the original's activation ratios, with a range detector


class EngineError(Exception):
    """The networks could not be loaded on the requested device."""


def _gpu_present() -> bool:
    return Path("/dev/nvidiactl").exists()


def choose_providers(device: Device, available: list[str]) -> list[str]:
    """The providers to ask for. onnxruntime-gpu lists CUDA even on a machine without a GPU, so
    CUDA is asked for only when a GPU device node exists; the provider really used is read back
    from the session afterwards."""
    if device == "cpu":
        return [CPU]
    cuda_ok = CUDA in available and _gpu_present()
    if device == "cuda" and not cuda_ok:
        raise EngineError("device 'cuda' requested but no CUDA GPU is usable by onnxruntime")
    return [CUDA, CPU] if cuda_ok else [CPU]


CUDA_OPTIONS = {"use_tf32": "0"}
"""onnxruntime's CUDA provider computes convolutions and matrix products in TF32 by default
(10-bit mantissa) on Ampere and later GPUs: logits then differ from the CPU's, and from the
calibration's, by up to 2e-3 (measured on an H200; 3e-6 in FP32). The guard keeps full FP32,
so a request replayed on the CPU gets the same statistic and the same p-value. On the width-16
CIFAR ResNet-18 TF32 made no consistent difference to a network's time on the H200 (0.54 to
0.80 ms at batch 32 either way); a large model may lose some speed (docs/SERVING.md)."""


def session_options(threads: int = 0) -> Any:
    """The guard's onnxruntime session options: quiet, `threads` intra-op threads (0: the
    default), and a thread pool that does not spin. The guard's sessions run back to back on
    the same cores, and a pool left spinning after one run steals the cores from the other
    (measured: both networks cost 2.9x one with spinning on, 2.0x with it off, at batch 32 on
    2 cores); the benchmarks that time networks side by side use the same options."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads > 0:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def with_options(providers: list[str]) -> list[Any]:
    """`providers` as onnxruntime takes them, CUDA with CUDA_OPTIONS."""
    return [(p, dict(CUDA_OPTIONS)) if p == CUDA else p for p in providers]


def cut_to_outputs(network: Path | bytes, outputs: list[str]) -> Any:
    """The ONNX network (a file, or its bytes) cut down to the nodes `outputs` need (an onnx
    ModelProto): onnxruntime computes every node of a graph whichever outputs a run asks for."""
    import onnx
    import onnx.utils

    if isinstance(network, bytes):
        model = onnx.load_model_from_string(network)
    else:
        model = onnx.load(str(network))
    weights = {t.name for t in model.graph.initializer}  # listed as inputs by older exports
    inputs = [i.name for i in model.graph.input if i.name not in weights]
    return onnx.utils.Extractor(model).extract_model(inputs, outputs)


def _session(
    ort: Any,
    artifact: Artifact,
    role: str,
    opts: Any,
    providers: list[str],
    outputs: list[str] | None = None,
) -> Any:
    """An onnxruntime session of the artifact's network `role`, built from the bytes whose
    sha256 was just checked (`Artifact.network_bytes`: an ArtifactError if they do not match);
    bytes onnxruntime cannot load (corrupt, truncated, not ONNX: a file whose sha256 was
    recorded after the damage) are an EngineError naming the file.

    With `outputs`, the network cut down to the nodes those outputs need: onnxruntime computes
    every node of a graph whichever outputs a run asks for (the range detector's ratios cost
    about 14% of a width-16 original's time even when only its logits are fetched)."""
    data = artifact.network_bytes(role)
    name = artifact.network_path(role).name
    try:
        if outputs is not None:
            data = cut_to_outputs(data, outputs).SerializeToString()
        return ort.InferenceSession(data, opts, providers=with_options(providers))
    except Exception as exc:  # onnxruntime raises its own RuntimeError subclasses
        raise EngineError(f"onnxruntime cannot load {name}: {exc}") from None


class GuardEngine:
    """Runs the original and the bounded network (and the start detector's, if any) on the same
    batch and decides with MMDF.

    `original_only` loads the original network alone, without the range detector's output: all
    the unguarded baseline runs (`original_logits`); `logits` and `decide` then refuse."""

    def __init__(
        self,
        artifact: Artifact,
        device: Device = "auto",
        threads: int = 0,
        *,
        original_only: bool = False,
    ) -> None:
        import onnxruntime as ort

        self.artifact = artifact
        providers = choose_providers(device, ort.get_available_providers())
        opts = session_options(threads)
        self.original_only = original_only
        if original_only:
            plain = None if artifact.range_output is None else [artifact.output_name]
            self._sessions = [_session(ort, artifact, "original", opts, providers, plain)]
        else:
            roles = ["original", "bounded"]
            if artifact.start_path is not None:
                roles.append("start")
            self._sessions = [_session(ort, artifact, r, opts, providers) for r in roles]
        used = self._sessions[0].get_providers()
        if device == "cuda" and CUDA not in used:
            raise EngineError(f"CUDA requested but onnxruntime runs on {used}")
        self.providers: list[str] = list(used)
        self.device = "cuda" if CUDA in used else "cpu"
        self._cuda_batch = 0  # on CUDA: the fixed batch size every run is padded to

    def _feed(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The input feed; on CUDA padded with zero images to the largest batch seen so far.

        onnxruntime's CUDA convolutions set up again (and with the default exhaustive cuDNN
        search, search again) whenever the input shape differs from the previous call's:
        measured on an H100 with the CIFAR ResNet-18, 0.63 ms per batch of 32 at a fixed size
        against about 200 ms per call when sizes vary. Dynamic batching makes every size from 1
        to --max-batch-size, and warm-up runs the largest, so after warm-up every batch runs at
        that one shape; the padding costs next to nothing on a GPU.
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.device == "cuda":
            self._cuda_batch = max(self._cuda_batch, len(x))
            if len(x) < self._cuda_batch:
                pad = np.zeros((self._cuda_batch - len(x), *x.shape[1:]), dtype=np.float32)
                x = np.concatenate([x, pad])
        return {self.artifact.input.name: x}

    def logits(self, x: np.ndarray) -> Outputs:
        """Original, bounded and start-bounded logits (None without a start detector) and the
        original's activation ratios (None without a range detector, whose ratios come from
        the same run as the original logits) for a float32 batch [N, C, H, W] in pixel space."""
        if self.original_only:
            raise EngineError("this engine loaded the original network alone (original_only)")
        n, feed, out = len(x), self._feed(x), self.artifact.output_name
        first = [out] if self.artifact.range_output is None else [out, self.artifact.range_output]
        original = self._sessions[0].run(first, feed)
        runs = [s.run([out], feed)[0][:n] for s in self._sessions[1:]]
        ratios = original[1][:n] if len(original) > 1 else None
        return Outputs(original[0][:n], runs[0], runs[1] if len(runs) > 1 else None, ratios)

    def original_logits(self, x: np.ndarray) -> np.ndarray:
        """The original network's logits alone (the unguarded baseline; with `original_only`
        the network without the range detector's output, as a plain original would run)."""
        n, feed = len(x), self._feed(x)
        return self._sessions[0].run([self.artifact.output_name], feed)[0][:n]

    def decide(self, x: np.ndarray) -> Decisions:
        o = self.logits(x)
        a = self.artifact
        return decide(
            o.original,
            o.bounded,
            a.null,
            a.rule,
            a.start_detector(o.start),
            a.range_detector(o.ratios),
        )
