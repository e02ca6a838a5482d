"""EmotionalDAN: a two-stage Deep Alignment Network with an emotion head.

Shapes travel through the network in normalised crop coordinates (0..1 across
the input crop, pixel centres at (i + 0.5) / size) and leave it in pixels of
the input crop. Every step between the stages (similarity transform, warp,
landmark heatmap, feature image) is plain tensor arithmetic plus one
``grid_sample``, so the whole network exports to ONNX.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cabin_monitor.vision.framing import FLIP_68

NUM_LANDMARKS = 68
FC_UNITS = 256
SHAPE_UNITS = 64
BASE_CHANNELS = (64, 128, 256, 512)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network: the classes, width and input size."""

    class_names: tuple[str, ...]
    width: float = 1.0
    input_size: int = 112
    dropout: float = 0.4
    emotion_from_shape: bool = False

    def __post_init__(self) -> None:
        if self.input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16, got {self.input_size}")
        if not 0.0 < self.width <= 2.0:
            raise ValueError(f"width must be in (0, 2], got {self.width}")
        if len(self.class_names) < 2:
            raise ValueError("at least two emotion classes are needed")

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels of the four VGG blocks at this width."""
        return tuple(max(8, round(c * self.width)) for c in BASE_CHANNELS)

    def to_dict(self) -> dict[str, object]:
        """Plain-JSON form, as stored in checkpoints and ONNX metadata."""
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> ModelSpec:
        """Inverse of ``to_dict``."""
        names = d["class_names"]
        assert isinstance(names, list)
        return cls(
            class_names=tuple(str(n) for n in names),
            width=float(d["width"]),  # type: ignore[arg-type]
            input_size=int(d["input_size"]),  # type: ignore[call-overload]
            dropout=float(d.get("dropout", 0.4)),  # type: ignore[arg-type]
            emotion_from_shape=bool(d.get("emotion_from_shape", False)),
        )


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DanStage(nn.Module):
    """One DAN stage: four VGG blocks, FC256 and a 68-point shape correction."""

    def __init__(self, in_channels: int, spec: ModelSpec) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for cout in spec.channels:
            layers += _conv_bn_relu(cin, cout) + _conv_bn_relu(cout, cout)
            layers.append(nn.MaxPool2d(2))
            cin = cout
        self.features = nn.Sequential(*layers)
        side = spec.input_size // 16
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(spec.dropout),
            nn.Linear(cin * side * side, FC_UNITS, bias=False),
            nn.BatchNorm1d(FC_UNITS),
            nn.ReLU(inplace=True),
        )
        self.shape_head = nn.Linear(FC_UNITS, NUM_LANDMARKS * 2)
        # Start from "no correction": stage 1 begins at the mean shape.
        nn.init.zeros_(self.shape_head.weight)
        nn.init.zeros_(self.shape_head.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return (shape correction [N,68,2], FC256 features, last conv feature map)."""
        fmap = self.features(x)
        feat = self.fc(fmap)
        with _full_precision(x):
            delta = self.shape_head(feat.float()).view(-1, NUM_LANDMARKS, 2)
        return delta, feat, fmap


def _full_precision(x: Tensor) -> torch.autocast:
    """Geometry runs in float32 even inside a bfloat16 autocast region."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def fit_similarity(src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor]:
    """Least-squares similarity from src [N,K,2] to dst [K,2]: returns A [N,2,2] and t [N,2] with A @ p + t."""
    src_mean = src.mean(dim=1, keepdim=True)
    dst_mean = dst.mean(dim=0, keepdim=True)
    s = src - src_mean
    d = (dst - dst_mean).unsqueeze(0)
    norm = (s * s).sum(dim=(1, 2)).clamp_min(1e-8)
    a = (s * d).sum(dim=(1, 2)) / norm
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(dim=1) / norm
    # A wild stage-1 shape must not blow the warp up (or, through the inverse,
    # stage 2's correction): keep the scale within a factor of two.
    scale = torch.sqrt(a * a + b * b).clamp_min(1e-8)
    limited = scale.clamp(0.5, 2.0) / scale
    a = a * limited
    b = b * limited
    rot = torch.stack([torch.stack([a, -b], dim=-1), torch.stack([b, a], dim=-1)], dim=1)
    shift = dst_mean - torch.einsum("nij,nj->ni", rot, src_mean.squeeze(1))
    return rot, shift


def apply_similarity(rot: Tensor, shift: Tensor, pts: Tensor) -> Tensor:
    """Map points [N,K,2] through A @ p + t."""
    return torch.einsum("nij,nkj->nki", rot, pts) + shift.unsqueeze(1)


def invert_similarity(rot: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of a similarity given as (A, t)."""
    a = rot[:, 0, 0]
    b = rot[:, 1, 0]
    det = (a * a + b * b).clamp_min(1e-8)
    inv = torch.stack([torch.stack([a / det, b / det], dim=-1), torch.stack([-b / det, a / det], dim=-1)], dim=1)
    return inv, -torch.einsum("nij,nj->ni", inv, shift)


class EmotionalDAN(nn.Module):
    """Two DAN stages; the emotion head reads the last stage's FC256 features.

    With ``spec.emotion_from_shape`` it also reads the stage-2 shape in the mean-face
    frame (its offset from the mean shape, through a small encoder): posed expressions
    are geometric (raised brows, widened eyes, pressed lips), and the landmarks carry them.
    """

    def __init__(self, spec: ModelSpec, mean_shape: Tensor) -> None:
        super().__init__()
        if tuple(mean_shape.shape) != (NUM_LANDMARKS, 2):
            raise ValueError(f"mean_shape must be [68, 2], got {tuple(mean_shape.shape)}")
        self.spec = spec
        size = spec.input_size
        self.register_buffer("mean_shape", mean_shape.float().clone())  # normalised 0..1
        centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size
        gy, gx = torch.meshgrid(centres, centres, indexing="ij")
        self.register_buffer("pixel_grid", torch.stack([gx, gy], dim=-1).view(1, size * size, 2))
        self.stage1 = DanStage(1, spec)
        self.stage2 = DanStage(3, spec)
        half = size // 2
        self.feature_image = nn.Sequential(nn.Linear(FC_UNITS, half * half), nn.ReLU(inplace=True))
        head_in = FC_UNITS
        if spec.emotion_from_shape:
            self.shape_encoder = nn.Sequential(
                nn.Linear(NUM_LANDMARKS * 2, SHAPE_UNITS, bias=False),
                nn.BatchNorm1d(SHAPE_UNITS),
                nn.ReLU(inplace=True),
            )
            head_in += SHAPE_UNITS
        self.emotion_head = nn.Sequential(nn.Dropout(spec.dropout), nn.Linear(head_in, len(spec.class_names)))
        # Added to the logits of the inference graph only: the class prior put back at export
        # (prior_weight * log prior) when training balanced the logits; zeros otherwise.
        self.register_buffer("logit_bias", torch.zeros(len(spec.class_names)))

    mean_shape: Tensor
    pixel_grid: Tensor
    logit_bias: Tensor

    def load_weights(self, weights: dict[str, Tensor]) -> None:
        """Load a state dict; weights from before ``logit_bias`` existed keep it at zero."""
        if "logit_bias" not in weights:
            weights = {**weights, "logit_bias": torch.zeros_like(self.logit_bias)}
        self.load_state_dict(weights)

    def normalise(self, image: Tensor) -> Tensor:
        """Per-image standardisation of 0..255 grey input (robust to exposure and gain)."""
        mean = image.mean(dim=(1, 2, 3), keepdim=True)
        std = image.std(dim=(1, 2, 3), keepdim=True).clamp_min(1.0)
        return (image - mean) / std

    def _warp(self, image: Tensor, rot: Tensor, shift: Tensor) -> Tensor:
        """Resample the image into the mean-shape frame defined by A @ p + t."""
        size = self.spec.input_size
        inv_rot, inv_shift = invert_similarity(rot, shift)
        src = apply_similarity(inv_rot, inv_shift, self.pixel_grid.expand(image.shape[0], -1, -1))
        grid = (src * 2.0 - 1.0).view(-1, size, size, 2)
        return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _heatmap(self, shape: Tensor) -> Tensor:
        """DAN landmark heatmap 1 / (1 + distance to the nearest landmark, in pixels)."""
        size = self.spec.input_size
        grid = self.pixel_grid * size  # [1,P,2]
        pts = shape * size  # [N,68,2]
        # |g - p|^2 = |g|^2 + (|p|^2 - 2 g.p): the [N,P,68] term is one matmul plus one add,
        # and |g|^2 is added after the minimum, so the large tensor is written once and read once.
        cross = torch.matmul(grid, pts.transpose(1, 2) * -2.0) + (pts * pts).sum(-1).unsqueeze(1)
        sq = cross.min(dim=2).values + (grid * grid).sum(-1)
        nearest = sq.clamp_min(0.0).sqrt()
        return (1.0 / (1.0 + nearest)).view(-1, 1, size, size)

    def _head_input(self, feat2: Tensor, shape2_warped: Tensor) -> Tensor:
        """FC256 features, plus the encoded stage-2 shape offset from the mean face where the spec asks for it."""
        if not self.spec.emotion_from_shape:
            return feat2
        # Detached: the emotion loss must not bend the landmarks of faces that carry no landmark labels.
        offset = (shape2_warped.detach() - self.mean_shape.unsqueeze(0)).flatten(1)
        return torch.cat([feat2, self.shape_encoder(offset.to(feat2.dtype))], dim=1)

    def forward_all(self, image: Tensor) -> dict[str, Tensor]:
        """Run both stages; returns logits, both shapes (normalised), features and the last conv maps."""
        x = self.normalise(image.float())
        delta1, feat1, _ = self.stage1(x)
        half = self.spec.input_size // 2
        feat_img = self.feature_image(feat1).view(-1, 1, half, half)
        with _full_precision(x):
            shape1 = self.mean_shape.unsqueeze(0) + delta1
            # Alignment between stages follows the stage-1 estimate without
            # back-propagating through it, as in stage-wise DAN training.
            anchor = shape1.detach()
            rot, shift = fit_similarity(anchor, self.mean_shape)
            warped = self._warp(x, rot, shift)
            anchor_warped = apply_similarity(rot, shift, anchor)
            heat = self._heatmap(anchor_warped)
            feat_img = F.interpolate(feat_img.float(), scale_factor=2.0, mode="bilinear", align_corners=False)
            stage2_input = torch.cat([warped, heat, feat_img], dim=1)
        delta2, feat2, fmap2 = self.stage2(stage2_input)
        with _full_precision(x):
            shape2_warped = anchor_warped + delta2
            inv_rot, inv_shift = invert_similarity(rot, shift)
            shape2 = apply_similarity(inv_rot, inv_shift, shape2_warped)
        logits = self.emotion_head(self._head_input(feat2, shape2_warped))
        return {
            "logits": logits,
            "shape1": shape1,
            "shape2": shape2,
            "fmap2": fmap2,
            "rot": rot,
            "shift": shift,
        }

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """Inference graph: emotion probabilities [N,K] and landmarks [N,68,2] in input-crop pixels."""
        out = self.forward_all(image)
        probs = torch.softmax(out["logits"] + self.logit_bias, dim=1)
        return probs, out["shape2"] * self.spec.input_size


class MirrorAveraged(nn.Module):
    """Reads each face and its mirror image in one batch and averages the two answers.

    Landmarks of the mirrored face are mirrored back and re-indexed left/right
    before averaging. Costs one extra face per face; used at export time only.
    """

    def __init__(self, model: EmotionalDAN) -> None:
        super().__init__()
        self.model = model
        self.spec = model.spec
        self.register_buffer("flip_index", torch.as_tensor(FLIP_68))

    flip_index: Tensor

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """Same inputs and outputs as ``EmotionalDAN.forward``."""
        n = image.shape[0]
        probs, points = self.model(torch.cat([image, image.flip(-1)], dim=0))
        mirrored = points[n:].index_select(1, self.flip_index)
        mirrored = torch.stack([self.spec.input_size - mirrored[..., 0], mirrored[..., 1]], dim=-1)
        return (probs[:n] + probs[n:]) / 2, (points[:n] + mirrored) / 2
