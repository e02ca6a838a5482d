"""Model evaluation on labelled data with onnxruntime (no torch needed).

Emotion data: accuracy, class-balanced accuracy, per-class recall and the
confusion matrix (printed and drawn to a PNG), optionally beside a peer model
on the same images; where the file carries FER+ crowd votes, the same figures
against the crowd's majority label too. Landmark data: inter-ocular NME
(outer eye corners).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

from cabin_monitor.config import EmotionConfig
from cabin_monitor.datasets import (
    load_emotion_npz,
    load_landmarks_npz,
    split_by_image,
    subset_landmarks,
)
from cabin_monitor.tools.progress import Progress
from cabin_monitor.vision.emotion import EmotionModel
from cabin_monitor.vision.framing import limit_detail

# The peer (the `fer` package's mini-Xception) outputs its classes in this order.
PEER_CLASSES = ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral")
PEER_INPUT_PX = 64


@dataclass(frozen=True)
class EmotionScores:
    """Accuracy figures of one model on one labelled set."""

    accuracy: float
    balanced_accuracy: float
    per_class_recall: dict[str, float]
    confusion: list[list[int]]

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "accuracy": round(self.accuracy, 4),
            "balanced_accuracy": round(self.balanced_accuracy, 4),
            "per_class_recall": {k: round(v, 4) for k, v in self.per_class_recall.items()},
            "confusion": self.confusion,
        }


def score(labels: np.ndarray, predictions: np.ndarray, class_names: tuple[str, ...]) -> EmotionScores:
    """Accuracy, class-balanced accuracy and confusion matrix (rows: truth, columns: prediction)."""
    k = len(class_names)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    support = confusion.sum(1)
    recall = np.diag(confusion) / np.maximum(1, support)
    present = support > 0
    return EmotionScores(
        accuracy=float(np.trace(confusion) / max(1, confusion.sum())),
        balanced_accuracy=float(recall[present].mean()) if present.any() else 0.0,
        per_class_recall={n: float(r) for n, r, p in zip(class_names, recall, present, strict=True) if p},
        confusion=confusion.tolist(),
    )


def peer_probabilities(
    session: ort.InferenceSession, images: np.ndarray, class_names: tuple[str, ...], class_map: dict[str, str]
) -> np.ndarray:
    """The peer's probabilities for grey crops [N,H,W], re-ordered (and summed, for grouped classes) to ours."""
    name = session.get_inputs()[0].name
    out = []
    for i in range(0, len(images), 256):
        batch = np.stack(
            [cv2.resize(im, (PEER_INPUT_PX, PEER_INPUT_PX), interpolation=cv2.INTER_AREA) for im in images[i : i + 256]]
        ).astype(np.float32)
        batch = (batch / 127.5 - 1.0)[..., None]
        out.append(session.run(None, {name: batch})[0])
    raw = np.concatenate(out)
    mapped = np.zeros((len(raw), len(class_names)), dtype=np.float32)
    for j, peer_class in enumerate(PEER_CLASSES):
        target = class_map.get(peer_class, peer_class)
        if target in class_names:
            mapped[:, class_names.index(target)] += raw[:, j]
    return mapped


def confusion_png(path: Path, scores: EmotionScores, class_names: tuple[str, ...], title: str) -> None:
    """Draw a row-normalised confusion matrix with counts."""
    k = len(class_names)
    # Wide enough for the longest class name ("happiness") on both axes.
    cell, left, top = 80, 120, 70
    img = np.full((top + k * cell + 90, left + k * cell + 20, 3), 255, np.uint8)
    conf = np.array(scores.confusion, dtype=np.float64)
    norm = conf / np.maximum(1, conf.sum(1, keepdims=True))
    for r in range(k):
        for c in range(k):
            shade = int(255 - 200 * norm[r, c])
            x0, y0 = left + c * cell, top + r * cell
            cv2.rectangle(img, (x0, y0), (x0 + cell, y0 + cell), (255, shade, shade), -1)
            cv2.rectangle(img, (x0, y0), (x0 + cell, y0 + cell), (200, 200, 200), 1)
            colour = (255, 255, 255) if norm[r, c] > 0.55 else (0, 0, 0)
            cv2.putText(
                img, f"{norm[r, c]:.2f}", (x0 + 8, y0 + 28), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, 1, cv2.LINE_AA
            )
            cv2.putText(
                img, str(int(conf[r, c])), (x0 + 8, y0 + 50), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1, cv2.LINE_AA
            )
        cv2.putText(
            img, class_names[r], (6, top + r * cell + 44), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA
        )
    for c in range(k):
        cv2.putText(
            img,
            class_names[c],
            (left + c * cell + 4, top - 10),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.42,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
    cv2.putText(img, title, (6, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(
        img,
        f"accuracy {scores.accuracy:.3f}   balanced {scores.balanced_accuracy:.3f}   (rows: truth)",
        (6, top + k * cell + 30),
        cv2.FONT_HERSHEY_SIMPLEX,
        0.5,
        (0, 0, 0),
        1,
        cv2.LINE_AA,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)


def format_confusion(scores: EmotionScores, class_names: tuple[str, ...]) -> str:
    """The confusion matrix as aligned text."""
    w = max(9, *(len(n) for n in class_names)) + 1
    lines = ["truth \\ pred".ljust(w) + "".join(n[:8].rjust(9) for n in class_names)]
    for name, row in zip(class_names, scores.confusion, strict=True):
        lines.append(name.ljust(w) + "".join(str(v).rjust(9) for v in row))
    return "\n".join(lines)


def evaluate_emotion(model: EmotionModel, data: Path, peer: Path | None, limit: int | None) -> dict[str, Any]:
    """Scores of the model (and the peer) on an emotion ``.npz``."""
    class_map = json.loads(model.info.metadata.get("class_map", "{}"))
    dataset = load_emotion_npz(data, model.input_size, class_map, model.class_names)
    images, labels = dataset.images, dataset.labels
    crowd = dataset.crowd_labels()
    if limit:
        images, labels = images[:limit], labels[:limit]
        crowd = crowd[:limit] if crowd is not None else None
    probs = infer_all(model, images, f"evaluate {Path(data).name}")
    report: dict[str, Any] = {
        "data": str(data),
        "images": len(labels),
        "model": {"path": str(model.info.path), **_scores(labels, crowd, probs.argmax(1), model.class_names)},
    }
    if crowd is not None:
        report["crowd_images"] = int((crowd >= 0).sum())
    if peer is not None:
        session = ort.InferenceSession(str(peer), providers=["CPUExecutionProvider"])
        # The peer sees the original 48 px crops, as it was trained on them.
        raw = _raw_images(data, len(labels), class_map, model.class_names)
        peer_probs = peer_probabilities(session, raw, model.class_names, class_map)
        report["peer"] = {"path": str(peer), **_scores(labels, crowd, peer_probs.argmax(1), model.class_names)}
    return report


def infer_all(model: EmotionModel, images: np.ndarray, label: str, chunk: int = 256) -> np.ndarray:
    """The model's probabilities for ``images``, with a progress bar on a terminal."""
    out = []
    with Progress(label, len(images)) as bar:
        for i in range(0, len(images), chunk):
            out.append(model.infer(images[i : i + chunk])[0])
            bar.advance(len(out[-1]))
    return np.concatenate(out) if out else np.zeros((0, len(model.class_names)), np.float32)


def _scores(
    labels: np.ndarray, crowd: np.ndarray | None, predictions: np.ndarray, class_names: tuple[str, ...]
) -> dict[str, Any]:
    """Scores against the file's labels, plus ``crowd`` scores against the FER+ majority where it exists."""
    out = score(labels, predictions, class_names).to_dict()
    if crowd is not None:
        known = crowd >= 0
        out["crowd"] = score(crowd[known], predictions[known], class_names).to_dict()
    return out


def _raw_images(data: Path, n: int, class_map: dict[str, str], class_names: tuple[str, ...]) -> np.ndarray:
    dataset = load_emotion_npz(data, 48, class_map, class_names)
    return dataset.images[:n]


def evaluate_landmarks(
    model: EmotionModel, data: Path, holdout_only: bool, limit: int | None, detail_px: int | None = None
) -> dict[str, Any]:
    """Inter-ocular NME of the model's landmarks on a 68-point ``.npz``.

    With ``detail_px`` the same faces are read a second time brought to that
    detail level (``framing.limit_detail``), and the report says how far
    landmarks and emotions move: the model's sensitivity to sharpness.
    """
    dataset = load_landmarks_npz(data, model.input_size)
    if holdout_only:
        meta = json.loads(model.info.metadata.get("training_data", "{}"))
        _, held = split_by_image(
            dataset.names, float(meta.get("landmark_holdout_fraction", 0.15)), int(meta.get("split_seed", 0))
        )
        dataset = subset_landmarks(dataset, held)
    images, truth = dataset.images, dataset.landmarks * model.input_size
    if limit:
        images, truth = images[:limit], truth[:limit]
    probs, points = model.infer(images)
    iod = np.linalg.norm(truth[:, 36] - truth[:, 45], axis=-1)
    per_face = np.linalg.norm(points - truth, axis=-1).mean(-1) / np.maximum(iod, 1e-6)
    report = {
        "data": str(data),
        "images": len(per_face),
        "holdout_only": holdout_only,
        "model": {
            "path": str(model.info.path),
            "nme_inter_ocular": round(float(per_face.mean()), 5),
            "nme_median": round(float(np.median(per_face)), 5),
            "failure_rate_at_0.08": round(float((per_face > 0.08).mean()), 4),
        },
    }
    if detail_px:
        probs_d, points_d = model.infer(limit_detail(images, detail_px))
        per_face_d = np.linalg.norm(points_d - truth, axis=-1).mean(-1) / np.maximum(iod, 1e-6)
        report["detail"] = {
            "detail_px": detail_px,
            "nme_inter_ocular": round(float(per_face_d.mean()), 5),
            "top_emotion_agreement": round(float((probs.argmax(1) == probs_d.argmax(1)).mean()), 4),
            "mean_abs_probability_change": round(float(np.abs(probs - probs_d).sum(1).mean() / 2), 4),
            "top_emotion_share_sharp": _shares(probs.argmax(1), model.class_names),
            "top_emotion_share_detail": _shares(probs_d.argmax(1), model.class_names),
        }
    return report


def _shares(top: np.ndarray, class_names: tuple[str, ...]) -> dict[str, float]:
    counts = np.bincount(top, minlength=len(class_names)) / max(1, len(top))
    return {n: round(float(c), 3) for n, c in zip(class_names, counts, strict=True)}


def evaluate_command(args: argparse.Namespace) -> int:
    """The ``evaluate`` command."""
    model = EmotionModel(EmotionConfig(model_path=Path(args.model)))
    data = Path(args.data)
    with np.load(data, allow_pickle=False) as npz:
        is_landmarks = "landmarks" in npz.files
    out = Path(args.out) if args.out else None
    if is_landmarks:
        report = evaluate_landmarks(model, data, args.holdout_only, args.limit, args.detail_px)
        m = report["model"]
        print(
            f"{data}: {report['images']} faces, inter-ocular NME {m['nme_inter_ocular']:.4f} "
            f"(median {m['nme_median']:.4f}, >8%: {m['failure_rate_at_0.08']:.1%})"
        )
        if "detail" in report:
            d = report["detail"]
            print(
                f"  at {d['detail_px']} px of detail: NME {d['nme_inter_ocular']:.4f}, same top emotion on "
                f"{d['top_emotion_agreement']:.1%} of faces, probabilities moved {d['mean_abs_probability_change']:.3f}"
            )
    else:
        report = evaluate_emotion(model, data, Path(args.peer) if args.peer else None, args.limit)
        for who in ("model", "peer"):
            if who not in report:
                continue
            r = report[who]
            scores = EmotionScores(r["accuracy"], r["balanced_accuracy"], r["per_class_recall"], r["confusion"])
            print(f"{who}: {r['path']}\n  accuracy {r['accuracy']:.4f}  balanced accuracy {r['balanced_accuracy']:.4f}")
            if "crowd" in r:
                c = r["crowd"]
                print(
                    f"  FER+ majority labels ({report['crowd_images']} faces): accuracy {c['accuracy']:.4f}  "
                    f"balanced accuracy {c['balanced_accuracy']:.4f}"
                )
            print("  recall " + "  ".join(f"{k} {v:.2f}" for k, v in r["per_class_recall"].items()))
            print(format_confusion(scores, model.class_names))
            if out is not None:
                confusion_png(
                    out / f"confusion_{who}.png", scores, model.class_names, f"{Path(r['path']).name} on {data.name}"
                )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"report: {out / 'report.json'}", file=sys.stderr)
    return 0
