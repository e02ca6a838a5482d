"""Faces to emotions, the one chain every caller goes through: canonical crops cut by the aligner,
every crop of a frame read by the model in one call, and the landmarks taken back to frame pixels.

The daemon's ``FrameProcessor`` reads the aligned faces of each frame with ``FaceReader``;
``analyze`` and ``bench --model-only`` cut still images with ``crop_image`` and read those;
``explain`` (with its own PyTorch copy of the model) uses the crops of ``crop_image`` alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from cabin_monitor.messages import Face, FloatArray, Frame, ImageArray
from cabin_monitor.vision.align import FaceAligner, grey, landmarks_to_frame
from cabin_monitor.vision.detect import FaceDetector
from cabin_monitor.vision.emotion import EmotionModel


class Crop(Protocol):
    """A canonical grey crop and the transform it was cut with (an ``AlignedFace`` or a ``FaceCrop``)."""

    @property
    def crop(self) -> ImageArray:
        """S x S uint8."""
        ...

    @property
    def frame_to_crop(self) -> FloatArray:
        """2 x 3 affine, continuous pixel coordinates."""
        ...


@dataclass(frozen=True, slots=True)
class FaceCrop:
    """The canonical crop of a face in a still image, and where the face is."""

    box: tuple[float, float, float, float]  # x, y, width, height in image pixels
    score: float  # detection confidence; 1.0 for a whole image taken as one face
    crop: ImageArray
    frame_to_crop: FloatArray


@dataclass(frozen=True, slots=True)
class FaceReading:
    """The model's reading of one crop."""

    emotions: dict[str, float]  # class name -> probability, model order
    landmarks: FloatArray  # [68, 2] frame pixels


def crop_faces(aligner: FaceAligner, gray: ImageArray, faces: Sequence[Face]) -> list[FaceCrop]:
    """The canonical crop of each face in a grey image."""
    return [FaceCrop(face.box, face.score, *aligner.crop(gray, face)) for face in faces]


def crop_image(image: ImageArray, aligner: FaceAligner, detector: FaceDetector | None) -> list[FaceCrop]:
    """Crops of the faces ``detector`` finds in a still image, best first, cut by ``aligner``.

    The aligner carries the crop size and detail level, so a reader's own (``FaceReader.aligner``)
    cuts still images exactly as the daemon cuts frames. With no detector the whole image is one
    face, taken as already in the canonical framing.
    """
    gray = grey(image)
    if detector is None:
        h, w = gray.shape[:2]
        box = (0.0, 0.0, float(w), float(h))
        matrix = aligner.box_matrix(box)
        return [FaceCrop(box, 1.0, aligner.warp(gray, matrix), matrix)]
    return crop_faces(aligner, gray, detector.detect(Frame(frame_id=0, capture_s=0.0, wall_time_s=0.0, image=image)))


class FaceReader:
    """The emotion model behind the aligner: crops of ``model.input_size``, read in one batched call."""

    def __init__(self, model: EmotionModel) -> None:
        self.model = model
        self.aligner = FaceAligner(model.input_size, model.detail_px)

    def read(self, crops: Sequence[Crop]) -> list[FaceReading]:
        """The reading of each crop, in order."""
        if not crops:
            return []
        probs, points = self.model.infer(np.stack([c.crop for c in crops]))
        names = self.model.class_names
        return [
            FaceReading(
                emotions={name: float(v) for name, v in zip(names, p, strict=True)},
                landmarks=landmarks_to_frame(lm, c.frame_to_crop),
            )
            for c, p, lm in zip(crops, probs, points, strict=True)
        ]
