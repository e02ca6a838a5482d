"""int8 export of an EmotionalDAN ONNX model: onnxruntime static QDQ quantisation, checked against float32.

The convolutions and the two FC256 layers carry almost all of the model's cost and run in int8
(weights per channel, activations calibrated on real faces). Everything between the stages stays in
float32 on purpose: the per-image normalisation, the similarity fit, the warp, the landmark heatmap and
the shape heads are geometry, and a shape off by a pixel misplaces stage 2's whole input. The first
convolution of each stage can be kept in float32 too (``keep_first_conv``), as it sees the raw input.

Agreement with the float32 model (top-1 class on faces the calibration never saw, and the landmark
difference) is measured by ``agreement`` and written into the int8 model's metadata.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

INPUT_NAME = "image"
CALIBRATION_BATCH = 16


@dataclass(frozen=True)
class Agreement:
    """How closely an int8 model follows its float32 source on the same faces."""

    faces: int
    top1_agreement: float
    max_prob_diff: float
    mean_landmark_diff_px: float

    def to_dict(self) -> dict[str, float | int]:
        """Plain-JSON form, as written into the model's metadata."""
        return asdict(self)


class _Faces(CalibrationDataReader):  # type: ignore[misc]
    """Feeds uint8 faces [N,S,S] to the calibrator in batches."""

    def __init__(self, faces: np.ndarray) -> None:
        # Whole batches only: the histogram calibrators stack every batch's outputs.
        whole = len(faces) - len(faces) % CALIBRATION_BATCH
        self._batches: Iterator[np.ndarray] = iter(
            faces[i : i + CALIBRATION_BATCH] for i in range(0, whole, CALIBRATION_BATCH)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch.astype(np.float32)[:, None]}


def quantizable_nodes(model: onnx.ModelProto, keep_first_conv: bool) -> list[str]:
    """Names of the nodes to run in int8: every stage convolution and the stages' FC256 layers."""
    names = []
    for node in model.graph.node:
        in_stage = "/stage1/" in node.name or "/stage2/" in node.name
        if not in_stage:
            continue
        if (node.op_type == "Conv" and not (keep_first_conv and "/features.0/" in node.name)) or (
            node.op_type in ("MatMul", "Gemm") and "/fc/" in node.name
        ):
            names.append(node.name)
    return names


def quantize_int8(
    source: Path,
    out: Path,
    calibration_faces: np.ndarray,
    *,
    keep_first_conv: bool = True,
    method: str = "percentile",
) -> Path:
    """Write the int8 QDQ version of ``source`` to ``out``, calibrated on ``calibration_faces`` (uint8 [N,S,S])."""
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ValueError(f"calibration method must be one of {sorted(methods)}, got {method!r}")
    meta = {p.key: p.value for p in onnx.load(str(source)).metadata_props}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Folds the BatchNorms into the convolutions and the weight transposes into constants,
        # so each quantised node reads a plain initializer.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        nodes = quantizable_nodes(onnx.load(str(prepared)), keep_first_conv)
        quantize_static(
            str(prepared),
            str(out),
            _Faces(calibration_faces),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_quantize=nodes,
            calibrate_method=methods[method],
            extra_options={"CalibPercentile": 99.99} if method == "percentile" else {},
        )
    _write_metadata(out, meta | {"precision": "int8", "int8_nodes": str(len(nodes))})
    return out


def _write_metadata(path: Path, meta: dict[str, str]) -> None:
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "cabin-monitor"
    onnx.save(proto, str(path))


def _run(path: Path, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probs, points = [], []
    for i in range(0, len(faces), 64):
        p, lm = session.run(["emotion_probs", "landmarks"], {INPUT_NAME: faces[i : i + 64].astype(np.float32)[:, None]})
        probs.append(p)
        points.append(lm)
    return np.concatenate(probs), np.concatenate(points)


def agreement(float_model: Path, int8_model: Path, faces: np.ndarray) -> Agreement:
    """Top-1 agreement, largest probability difference and mean landmark difference on ``faces``."""
    probs_f, points_f = _run(float_model, faces)
    probs_q, points_q = _run(int8_model, faces)
    return Agreement(
        faces=len(faces),
        top1_agreement=float((probs_f.argmax(1) == probs_q.argmax(1)).mean()),
        max_prob_diff=float(np.abs(probs_f - probs_q).max()),
        mean_landmark_diff_px=float(np.linalg.norm(points_f - points_q, axis=-1).mean()),
    )


def record_agreement(path: Path, result: Agreement) -> None:
    """Write the measured agreement into the int8 model's metadata."""
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    _write_metadata(path, meta | {"int8_agreement": json.dumps(result.to_dict())})


def pick_faces(images: np.ndarray, count: int, seed: int, exclude: Sequence[int] = ()) -> np.ndarray:
    """``count`` faces drawn without replacement, never one of ``exclude``."""
    allowed = np.setdiff1d(np.arange(len(images)), np.asarray(exclude, dtype=np.int64))
    chosen = np.random.default_rng(seed).choice(allowed, size=min(count, len(allowed)), replace=False)
    return np.asarray(images[np.sort(chosen)])
