"""The models in models/ are trained: far above chance on real faces they were not trained on."""

from __future__ import annotations

from pathlib import Path

from cabin_monitor.config import EmotionConfig
from cabin_monitor.tools.evaluate import evaluate_emotion, evaluate_landmarks
from cabin_monitor.vision.emotion import EmotionModel

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


def load(name: str) -> EmotionModel:
    """A shipped model on the CPU provider."""
    return EmotionModel(EmotionConfig(model_path=REPO / "models" / name))


def test_seven_class_model_reads_validation_faces() -> None:
    """The default model is right on most of 84 FER2013 validation faces (chance: 1 in 7)."""
    model = load("emotionaldan-7.onnx")
    report = evaluate_emotion(model, DATA / "fer2013_val.npz", None, None)
    assert report["images"] == 84
    assert report["model"]["accuracy"] >= 0.45
    assert report["model"]["balanced_accuracy"] >= 0.35


def test_seven_class_model_places_landmarks() -> None:
    """Its 68 points land within 10% of the inter-ocular distance on average."""
    model = load("emotionaldan-7.onnx")
    report = evaluate_landmarks(model, DATA / "landmarks68_train.npz", False, None)
    assert report["model"]["nme_inter_ocular"] <= 0.10


def test_three_class_model_reads_grouped_labels() -> None:
    """The 3-class model groups the 7 labels as its metadata says and is right on most faces."""
    model = load("emotionaldan-3.onnx")
    assert model.class_names == ("neutral", "positive", "negative")
    report = evaluate_emotion(model, DATA / "fer2013_val.npz", None, None)
    assert report["model"]["accuracy"] >= 0.55
