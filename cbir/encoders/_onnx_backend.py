"""int8 inference through ONNX Runtime: export once, quantize statically on the collection, cache on disk.

The network is exported to ONNX (cached by encoder name, pooling, input size and weights sha256), then
quantized statically (QDQ, per-channel int8 weights, uint8 activations) with activation ranges calibrated on
images of the collection being indexed (cached by the calibration images' hash). Whether the result is
faithful enough to use is not decided here but measured by `_numeric.py`, because it depends on the
network: depthwise-convolution networks such as EfficientNet-Lite0 lose much more than ResNets.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cbir.errors import CbirError
from cbir.files import atomic_path, sha256_bytes, sha256_file


def available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def cache_dir() -> Path:
    """$CBIR_CACHE/onnx, default ~/.cache/cbir/onnx."""
    from cbir.cache import cache_dir as base

    return base("onnx")


def _key(encoder: Any) -> str:
    from cbir.cache import model_key

    return model_key({"name": encoder.name, "pooling": encoder.pooling, "weights": encoder.weights,
                      "preprocess": {"size": encoder.preprocess.size}, "options": encoder.options})


def export_fp32(encoder: Any) -> Path:
    """The encoder's network (pooled features out) as ONNX with a dynamic batch size."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    path = cache_dir() / f"{_key(encoder)}.onnx"
    if path.is_file():
        return path
    size = encoder.preprocess.size
    model = encoder.model.cpu().eval().to(memory_format=torch.contiguous_format)
    raw = path.with_suffix(f".raw-{os.getpid()}.onnx")
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), _plain_attention():
            warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation on every call
            torch.onnx.export(model, (torch.zeros(2, 3, size, size),), str(raw), dynamo=False, opset_version=17,
                              input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
        with atomic_path(path, suffix=".onnx") as tmp:
            try:
                quant_pre_process(str(raw), str(tmp))  # shape inference and graph clean-up that quantization expects
            except Exception:  # ORT's symbolic shape inference fails on some attention graphs (open_clip's ViT)
                quant_pre_process(str(raw), str(tmp), skip_symbolic_shape=True)
    except Exception as exc:
        raise CbirError(f"cannot export {encoder.name} to ONNX for int8: {exc.__class__.__name__}: {exc}") from exc
    finally:
        raw.unlink(missing_ok=True)
        encoder.model.to(encoder.device)
        if encoder.device.type == "cpu":
            encoder.model.to(memory_format=torch.channels_last)
    return path


@contextlib.contextmanager
def _plain_attention() -> Iterator[None]:
    """nn.MultiheadAttention's fused inference kernel (CLIP's towers use it) has no ONNX form; its plain ops do."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def quantize_int8(encoder: Any, calibration: np.ndarray) -> Path:
    """Static int8 model calibrated on `calibration` [N, 3, H, W] (preprocessed images of the collection)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    digest = sha256_bytes(calibration.tobytes())[:16]
    path = cache_dir() / f"{_key(encoder)}-int8-{digest}.onnx"
    if path.is_file():
        return path
    fp32 = export_fp32(encoder)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": calibration[i:i + 8]} for i in range(0, len(calibration), 8)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with atomic_path(path, suffix=".onnx") as tmp:
        quantize_static(str(fp32), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return path


class OrtModel:
    """An ONNX Runtime session that maps a preprocessed batch to pooled features."""

    def __init__(self, path: str | Path, sha256: str | None = None) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise CbirError(f"the int8 model {path} is missing; re-index with --precision fp32 or bf16, or put "
                            "the file back")
        self.path, self.sha256 = path, sha256_file(path)
        if sha256 is not None and sha256 != self.sha256:
            raise CbirError(f"the int8 model {path} is not the one the index was built with (sha256 differs)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})[0]

    def record(self) -> dict[str, str]:
        return {"path": str(self.path), "sha256": self.sha256}
