"""Labelled face data files: emotion-labelled faces and 68-point landmark faces, in the canonical framing.

Read by training, evaluation and the scripts alike, so numpy and OpenCV only (no torch).

Two on-disk formats are read:

* ``.npz`` files as in the project's data folder: ``jpeg`` (concatenated JPEG
  files), ``offsets``, and either ``labels`` + ``classes`` (emotion) or
  ``landmarks`` [N,68,2] in pixels (landmarks).
* AffectNet-style folders for emotion data: ``DIR/<class name>/*.jpg|png``,
  with class names from the model's class list.

Emotion crops are taken as already canonical (FER2013 framing defines the
template); landmark crops are warped onto the template from their own points.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from cabin_monitor.vision.framing import TEMPLATE_5, apply_affine, cv2_matrix, five_points_from_68, similarity_transform

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class EmotionSet:
    """Canonical grey crops [N,S,S] with class indices [N] into ``class_names``.

    ``votes`` [N,K] holds the FER+ crowd votes per model class where the file
    carries them (a row of zeros where no tagger's vote maps to a model class).
    """

    images: U8
    labels: I64
    class_names: tuple[str, ...]
    votes: F32 | None = None

    def crowd_labels(self) -> I64 | None:
        """The FER+ majority class of each face (-1 where votes are missing or tied), or None without votes."""
        if self.votes is None:
            return None
        top = self.votes.max(axis=1, keepdims=True)
        unique = (self.votes == top).sum(axis=1) == 1
        return np.where(unique & (top[:, 0] > 0), self.votes.argmax(axis=1), -1).astype(np.int64)


@dataclass(frozen=True)
class LandmarkSet:
    """Canonical grey crops [N,S,S] with 68 points [N,68,2] in normalised crop units (0..1)."""

    images: U8
    landmarks: F32
    names: tuple[str, ...]


def warp_to_canonical(gray: U8, matrix: F32, size: int) -> U8:
    """Warp a grey image with a continuous-coordinate affine into a size x size crop."""
    out = cv2.warpAffine(
        gray, cv2_matrix(matrix), (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    return np.asarray(out, dtype=np.uint8)


def _decode_all(npz: np.lib.npyio.NpzFile) -> list[U8]:
    jpeg = npz["jpeg"]
    offsets = npz["offsets"]
    images = []
    for i in range(len(offsets) - 1):
        img = cv2.imdecode(jpeg[offsets[i] : offsets[i + 1]], cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise ValueError(f"image {i} does not decode as JPEG")
        images.append(np.asarray(img, dtype=np.uint8))
    return images


def _resize_square(gray: U8, size: int) -> U8:
    interp = cv2.INTER_AREA if gray.shape[0] > size else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(gray, (size, size), interpolation=interp), dtype=np.uint8)


def load_emotion_npz(
    path: Path,
    size: int,
    class_map: dict[str, str],
    class_names: tuple[str, ...],
    max_unknown_votes: int | None = None,
) -> EmotionSet:
    """Load an emotion ``.npz`` and map its classes onto ``class_names`` through ``class_map``.

    Where the file has ``ferplus_votes``, they are mapped the same way, and (when
    ``max_unknown_votes`` is given) faces with at least that many 'unknown' or
    'not a face' votes are dropped.
    """
    with np.load(path, allow_pickle=False) as npz:
        for key in ("jpeg", "offsets", "labels", "classes"):
            if key not in npz.files:
                raise ValueError(f"{path}: missing array '{key}' (has {sorted(npz.files)})")
        file_classes = [str(c) for c in npz["classes"]]
        raw_labels = npz["labels"].astype(np.int64)
        raw_votes = npz["ferplus_votes"].astype(np.float32) if "ferplus_votes" in npz.files else None
        vote_classes = [str(c) for c in npz["ferplus_classes"]] if raw_votes is not None else []
        images = _decode_all(npz)
    lookup = _class_lookup(file_classes, class_map, class_names, str(path))
    labels = lookup[raw_labels]
    keep = labels >= 0
    votes = None
    if raw_votes is not None:
        votes, unknown = _map_votes(raw_votes, vote_classes, class_map, class_names, str(path))
        if max_unknown_votes is not None:
            keep &= unknown < max_unknown_votes
        votes = votes[keep]
    stack = np.stack([_resize_square(img, size) for img, k in zip(images, keep, strict=True) if k])
    return EmotionSet(stack, labels[keep], class_names, votes)


def _map_votes(
    raw: F32, vote_classes: list[str], class_map: dict[str, str], class_names: tuple[str, ...], where: str
) -> tuple[F32, F32]:
    """FER+ votes summed per model class [N,K], and the 'unknown' + 'not a face' votes [N]; -1 rows count as none."""
    matched = (raw >= 0).all(axis=1, keepdims=True)
    raw = np.where(matched, raw, 0.0).astype(np.float32)
    lookup = _class_lookup(vote_classes, class_map, class_names, where)
    votes = np.zeros((len(raw), len(class_names)), dtype=np.float32)
    for source, target in enumerate(lookup):
        if target >= 0:
            votes[:, target] += raw[:, source]
    junk = [i for i, name in enumerate(vote_classes) if name in ("unknown", "NF")]
    return votes, raw[:, junk].sum(axis=1)


def load_emotion_folder(root: Path, size: int, class_map: dict[str, str], class_names: tuple[str, ...]) -> EmotionSet:
    """Load ``root/<class>/*.jpg`` face crops; folders whose class maps to nothing are skipped."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{root}: no class folders found")
    lookup = _class_lookup([p.name for p in folders], class_map, class_names, str(root))
    images: list[U8] = []
    labels: list[int] = []
    for folder, label in zip(folders, lookup, strict=True):
        if label < 0:
            continue
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            img = cv2.imread(str(file), cv2.IMREAD_GRAYSCALE)
            if img is None:
                raise ValueError(f"{file}: not a readable image")
            images.append(_resize_square(_center_square(img), size))
            labels.append(int(label))
    if not images:
        raise ValueError(f"{root}: no images found")
    return EmotionSet(np.stack(images), np.asarray(labels, dtype=np.int64), class_names)


def load_emotion(
    path: Path,
    size: int,
    class_map: dict[str, str],
    class_names: tuple[str, ...],
    max_unknown_votes: int | None = None,
) -> EmotionSet:
    """Load emotion data from an ``.npz`` file or a class-folder tree."""
    if path.is_dir():
        return load_emotion_folder(path, size, class_map, class_names)
    if path.suffix == ".npz":
        return load_emotion_npz(path, size, class_map, class_names, max_unknown_votes)
    raise ValueError(f"{path}: expected an .npz file or a folder of class folders")


def _center_square(gray: U8) -> U8:
    h, w = gray.shape[:2]
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    return gray[y0 : y0 + side, x0 : x0 + side]


def _class_lookup(source: list[str], class_map: dict[str, str], class_names: tuple[str, ...], where: str) -> I64:
    """Index of each source class in ``class_names`` (-1 where the map drops it)."""
    lookup = np.full(len(source), -1, dtype=np.int64)
    for i, name in enumerate(source):
        target = class_map.get(name, name if name in class_names else None)
        if target is None:
            continue
        if target not in class_names:
            raise ValueError(f"{where}: class '{name}' maps to '{target}', which is not a model class")
        lookup[i] = class_names.index(target)
    if (lookup < 0).all():
        raise ValueError(f"{where}: none of the classes {source} maps to the model classes {list(class_names)}")
    return lookup


def load_landmarks_npz(path: Path, size: int) -> LandmarkSet:
    """Load a 68-point ``.npz`` and warp every face onto the canonical template."""
    with np.load(path, allow_pickle=False) as npz:
        for key in ("jpeg", "offsets", "landmarks"):
            if key not in npz.files:
                raise ValueError(f"{path}: missing array '{key}' (has {sorted(npz.files)})")
        points = npz["landmarks"].astype(np.float32)
        names = tuple(str(n) for n in npz["names"]) if "names" in npz.files else tuple(map(str, range(len(points))))
        images = _decode_all(npz)
    if points.shape[1:] != (68, 2) or len(points) != len(images):
        raise ValueError(f"{path}: landmarks must be [N,68,2] for N images, got {points.shape}")
    template = TEMPLATE_5 * size
    crops = []
    shapes = []
    for img, pts in zip(images, points, strict=True):
        matrix = similarity_transform(five_points_from_68(pts), template)
        crops.append(warp_to_canonical(img, matrix, size))
        shapes.append(apply_affine(matrix, pts) / size)
    return LandmarkSet(np.stack(crops), np.stack(shapes).astype(np.float32), names)


def source_image_key(name: str) -> str:
    """Group key of a face: faces cut from one photo (``photo_1.jpg``, ``photo_2.jpg``) share it."""
    stem = Path(name).stem
    return str(Path(name).parent / re.sub(r"_\d+$", "", stem))


def split_by_image(names: tuple[str, ...], holdout_fraction: float, seed: int) -> tuple[I64, I64]:
    """Split indices into (train, holdout) so that no source photo lands on both sides."""
    keys = sorted({source_image_key(n) for n in names})
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(keys))
    n_hold = round(len(keys) * holdout_fraction)
    held = {keys[i] for i in order[:n_hold]}
    mask = np.array([source_image_key(n) in held for n in names])
    return np.flatnonzero(~mask).astype(np.int64), np.flatnonzero(mask).astype(np.int64)


def subset_landmarks(data: LandmarkSet, index: I64) -> LandmarkSet:
    """The faces of ``data`` at ``index``."""
    return LandmarkSet(data.images[index], data.landmarks[index], tuple(data.names[i] for i in index))


def subset_emotion(data: EmotionSet, index: I64) -> EmotionSet:
    """The faces of ``data`` at ``index``."""
    votes = data.votes[index] if data.votes is not None else None
    return EmotionSet(data.images[index], data.labels[index], data.class_names, votes)
