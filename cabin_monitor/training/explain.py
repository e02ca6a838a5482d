"""Class activation maps for EmotionalDAN: which parts of the face drive an emotion decision.

The maps are HiResCAM, the element-wise form of Grad-CAM (gradient times activation at each position).

The network is rebuilt in PyTorch from the ONNX file itself (the export keeps
every parameter under its PyTorch name). The map is taken at stage 2's last
convolution block, which works in the mean-shape frame, and is carried back to
the input crop through the inverse of the stage-1 similarity transform.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from cabin_monitor.config import DetectorConfig
from cabin_monitor.datasets import load_emotion_npz
from cabin_monitor.training.export import load_onnx_as_torch, onnx_metadata
from cabin_monitor.training.model import EmotionalDAN, apply_similarity
from cabin_monitor.vision.align import FaceAligner
from cabin_monitor.vision.detect import create_detector
from cabin_monitor.vision.reader import crop_image


def grad_cam(
    model: EmotionalDAN, crops: np.ndarray, class_index: list[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Heat maps [N,S,S] in 0..1 over the input crops, for ``class_index`` (default: the predicted class).

    Also returns the probabilities [N,K].
    """
    size = model.spec.input_size
    x = torch.from_numpy(crops.astype(np.float32)[:, None])
    out = model.forward_all(x)
    fmap = out["fmap2"]
    fmap.retain_grad()
    # The answer the daemon gives: the inference graph adds the exported class-prior bias.
    probs = torch.softmax(out["logits"] + model.logit_bias, 1)
    target = probs.argmax(1) if class_index is None else torch.tensor(class_index)
    picked = out["logits"].gather(1, target[:, None]).sum()
    model.zero_grad()
    picked.backward()  # type: ignore[no-untyped-call]
    assert fmap.grad is not None
    # Element-wise gradient x activation (HiResCAM), not Grad-CAM's channel-mean weights: stage 2
    # flattens its map into a fully connected layer, so each position has its own weights, and
    # channel means can cancel to an empty map for a class the face clearly shows.
    cam = F.relu((fmap.grad * fmap).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)
    # The map lives in the stage-2 (mean-shape) frame: sample it at T(p) for each crop pixel p.
    rot, shift = out["rot"].detach(), out["shift"].detach()
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    gy, gx = torch.meshgrid(centres, centres, indexing="ij")
    grid_pts = torch.stack([gx, gy], -1).view(1, -1, 2).expand(len(crops), -1, -1)
    warped = apply_similarity(rot, shift, grid_pts).view(-1, size, size, 2) * 2 - 1
    cam = F.grid_sample(cam, warped, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(1).values.clamp_min(1e-8)[:, None, None]
    return (cam / peak).numpy(), probs.detach().numpy()


def overlay(crop: np.ndarray, cam: np.ndarray, label: str) -> np.ndarray:
    """The crop and the crop under a colour heat map, side by side, with a caption."""
    face = cv2.cvtColor(crop, cv2.COLOR_GRAY2BGR)
    heat = cv2.applyColorMap(np.uint8(255 * cam), cv2.COLORMAP_JET)
    blended = cv2.addWeighted(face, 0.5, heat, 0.5, 0)
    panel = np.hstack([face, blended])
    panel = cv2.resize(panel, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
    cv2.putText(panel, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return np.asarray(panel, dtype=np.uint8)


def _crops_for(path: Path, size: int, assume_face: bool, detail_px: int) -> list[np.ndarray]:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: not a readable image")
    detector = None if assume_face else create_detector(DetectorConfig(type="yunet", min_face_px=16))
    try:
        return [c.crop for c in crop_image(image, FaceAligner(size, detail_px), detector)]
    finally:
        if detector is not None:
            detector.close()


def mean_by_class(
    model: EmotionalDAN, data: Path, limit: int
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, int]]:
    """Per class: (average Grad-CAM, average face) over the correctly classified faces of a labelled ``.npz``."""
    names = model.spec.class_names
    dataset = load_emotion_npz(data, model.spec.input_size, {}, names)
    images, labels = dataset.images[:limit], dataset.labels[:limit]
    sums = {n: np.zeros((model.spec.input_size,) * 2) for n in names}
    faces = {n: np.zeros((model.spec.input_size,) * 2) for n in names}
    counts = dict.fromkeys(names, 0)
    for i in range(0, len(labels), 64):
        cams, probs = grad_cam(model, images[i : i + 64], labels[i : i + 64].tolist())
        for cam, p, label, img in zip(cams, probs, labels[i : i + 64], images[i : i + 64], strict=True):
            if p.argmax() != label:
                continue
            name = names[label]
            sums[name] += cam
            faces[name] += img
            counts[name] += 1
    return {n: (sums[n] / max(1, counts[n]), faces[n] / max(1, counts[n])) for n in names}, counts


def explain_command(args: argparse.Namespace) -> int:
    """The ``explain`` command."""
    from cabin_monitor.assets import DEFAULT_EMOTION_MODEL, find_model

    model_path = Path(args.model) if args.model else find_model(DEFAULT_EMOTION_MODEL)
    model = load_onnx_as_torch(model_path)
    # The crops are cut as the daemon cuts them, at the model's detail level.
    detail_px = int(onnx_metadata(model_path).get("detail_px", "0"))
    names = model.spec.class_names
    unknown = [c for c in args.classes if c not in names]
    if unknown:
        print(f"cabin-monitor: unknown class {unknown}; the model has {list(names)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for image_path in map(Path, args.images):
        crops = _crops_for(image_path, model.spec.input_size, args.assume_face, detail_px)
        if not crops:
            print(f"{image_path}: no face found", file=sys.stderr)
            continue
        for face_no, crop in enumerate(crops):
            batch = crop[None]
            _, probs = grad_cam(model, batch)
            wanted = [int(probs[0].argmax())] + [names.index(c) for c in args.classes]
            for k in dict.fromkeys(wanted):
                cam, _ = grad_cam(model, batch, [k])
                stem = f"{image_path.stem}_face{face_no}_{names[k]}"
                cv2.imwrite(str(out / f"{stem}.png"), overlay(crop, cam[0], f"{names[k]} p={probs[0][k]:.2f}"))
                np.save(out / f"{stem}.npy", cam[0].astype(np.float32))
                print(out / f"{stem}.png")
                if not cam[0].any():
                    # Grad-CAM keeps only regions that raise the class score; none did.
                    print(
                        f"warning: {stem}: the map is empty: no region of this face raises the {names[k]} score"
                        f" (p={probs[0][k]:.2f})",
                        file=sys.stderr,
                    )
    if args.mean_by_class:
        maps, counts = mean_by_class(model, Path(args.mean_by_class), args.limit)
        panels = []
        for name in names:
            cam, face = maps[name]
            peak = cam.max() if cam.max() > 0 else 1.0
            panels.append(overlay(face.astype(np.uint8), cam / peak, f"{name} n={counts[name]}"))
            np.save(out / f"mean_{name}.npy", (cam / peak).astype(np.float32))
        cv2.imwrite(str(out / "mean_by_class.png"), np.vstack(panels))
        print(out / "mean_by_class.png")
    return 0
