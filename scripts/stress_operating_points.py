"""Stress operating points of an emotion model: the share of validation faces whose single-frame stress
score (the sum of the rule's classes) reaches each threshold, by the face's original label.

    python scripts/stress_operating_points.py --model models/emotionaldan-7.onnx \\
        --data ../shared/data/fer2013_val.npz

Prints one Markdown table (the one in models/README.md, "Stress operating points").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cabin_monitor.config import NEGATIVE_7, EmotionConfig
from cabin_monitor.datasets import load_emotion_npz
from cabin_monitor.tools.evaluate import infer_all
from cabin_monitor.vision.emotion import EmotionModel

THRESHOLDS = (0.5, 0.6, 0.7, 0.8)
GROUPS = {
    "negative-labelled faces": NEGATIVE_7,
    "neutral faces": ("neutral",),
    "happy or surprised faces": ("happiness", "surprise"),
}


def main() -> None:
    """Read every validation face once and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="7-class EmotionalDAN ONNX model")
    parser.add_argument("--data", type=Path, required=True, help="emotion .npz (fer2013_val.npz)")
    args = parser.parse_args()
    model = EmotionModel(EmotionConfig(model_path=args.model, providers=["cpu"]))
    names = model.class_names
    dataset = load_emotion_npz(
        args.data, model.input_size, json.loads(model.info.metadata.get("class_map", "{}")), names
    )
    probs = infer_all(model, dataset.images, "stress operating points")
    stress = probs[:, [names.index(c) for c in NEGATIVE_7]].sum(axis=1)
    print(f"model {model.info.version}: {len(stress)} faces")
    print("| group score ≥ | " + " | ".join(f"{t}" for t in THRESHOLDS) + " |")
    print("| --- |" + " --- |" * len(THRESHOLDS))
    for group, classes in GROUPS.items():
        members = np.isin(dataset.labels, [names.index(c) for c in classes])
        shares = [f"{100 * float((stress[members] >= t).mean()):.0f} %" for t in THRESHOLDS]
        print(f"| {group} ({int(members.sum()):,}) | " + " | ".join(shares) + " |")


if __name__ == "__main__":
    main()
