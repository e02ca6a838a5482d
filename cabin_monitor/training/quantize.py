"""int8 export of an EmotionalDAN ONNX model: onnxruntime static QDQ quantisation, checked against float32.

The convolutions and FC256 layers carry almost all of the model's cost; those of the chosen stages run in
int8 (weights per channel, activations calibrated on real faces). Stage 1 alone is the default: measured
on 0.9.0 (1,500 validation faces), stage 1 in int8 keeps 99.5 % of the top-1 answers and moves landmarks
by 0.14 px, while stage 2 in int8 keeps only 94-95 % (its input mixes the warped image, the heatmap and the
feature image, whose ranges one calibration serves badly). Everything between the stages stays in
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


STAGES = ("stage1", "stage2")


def quantizable_nodes(model: onnx.ModelProto, stages: Sequence[str], keep_first_conv: bool) -> list[str]:
    """Names of the nodes to run in int8: the convolutions and the FC256 layer of each stage in ``stages``."""
    names = []
    for node in model.graph.node:
        stage = next((s for s in stages if f"/{s}/" in node.name), None)
        if stage is None:
            continue
        first_conv = keep_first_conv and "/features.0/" in node.name
        if (node.op_type == "Conv" and not first_conv) or (node.op_type in ("MatMul", "Gemm") and "/fc/" in node.name):
            names.append(node.name)
    return names


def quantize_int8(
    source: Path,
    out: Path,
    calibration_faces: np.ndarray,
    *,
    stages: Sequence[str] = ("stage1",),
    keep_first_conv: bool = True,
    method: str = "minmax",
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
        nodes = quantizable_nodes(onnx.load(str(prepared)), stages, keep_first_conv)
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
    _write_metadata(out, meta | {"precision": "int8", "int8_stages": json.dumps(list(stages))})
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


def quantize_command(
    model: Path, data_dir: Path, out: Path, *, calibration_faces: int, check_faces: int, min_agreement: float
) -> tuple[Path, Agreement]:
    """Quantise ``model`` calibrated on training faces, measure agreement on validation faces, record it.

    Raises ``ValueError`` (and leaves no file) when the agreement is below ``min_agreement``.
    """
    from cabin_monitor.datasets import load_emotion_npz, load_landmarks_npz

    meta = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    size = int(meta["input_size"])
    names = tuple(json.loads(meta["class_names"]))
    class_map = json.loads(meta.get("class_map", "{}"))
    train = load_emotion_npz(data_dir / "fer2013_train.npz", size, class_map, names)
    landmarks = load_landmarks_npz(data_dir / "landmarks68_train.npz", size)
    val = load_emotion_npz(data_dir / "fer2013_val.npz", size, class_map, names)
    calibration = np.concatenate(
        [pick_faces(train.images, calibration_faces, seed=0), pick_faces(landmarks.images, calibration_faces // 8, 0)]
    )
    quantize_int8(model, out, calibration)
    result = agreement(model, out, val.images[:check_faces])
    if result.top1_agreement < min_agreement:
        out.unlink()
        raise ValueError(
            f"int8 model agrees with {model.name} on {result.top1_agreement:.1%} of {result.faces} validation faces,"
            f" below --min-agreement {min_agreement:.1%}; nothing written"
        )
    record_agreement(out, result)
    return out, result
