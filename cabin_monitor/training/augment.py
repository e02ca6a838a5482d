"""Batched face augmentation on tensors: box jitter, flips with landmark re-indexing, camera effects."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cabin_monitor.training.config import AugmentSection
from cabin_monitor.vision.framing import FLIP_68

_FLIP = torch.as_tensor(FLIP_68)


def augment_batch(
    images: Tensor, landmarks: Tensor | None, cfg: AugmentSection, gen: torch.Generator
) -> tuple[Tensor, Tensor | None]:
    """Augment grey crops [N,1,S,S] (0..255 float) and their normalised landmarks [N,68,2].

    The geometric part moves the crop the way a detector's box and keypoints
    jitter (rotation, zoom, shift) and mirrors faces; landmarks follow, with
    left/right points swapped on mirrored faces.
    """
    n = images.shape[0]
    dev = images.device

    def uniform(lo: float, hi: float, size: tuple[int, ...] = (n,)) -> Tensor:
        return torch.rand(size, generator=gen).to(dev) * (hi - lo) + lo

    angle = uniform(-cfg.rotate_deg, cfg.rotate_deg) * (math.pi / 180.0)
    scale = torch.exp(uniform(-math.log1p(cfg.scale_jitter), math.log1p(cfg.scale_jitter)))
    shift = uniform(-cfg.shift_jitter, cfg.shift_jitter, (n, 2))
    flip = (torch.rand(n, generator=gen).to(dev) < 0.5) if cfg.flip else torch.zeros(n, dtype=torch.bool, device=dev)

    cos, sin = torch.cos(angle), torch.sin(angle)
    # Forward map (normalised coords, centre 0.5): q = s R (p' - c) + c + shift, p' = p mirrored if flip.
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1) * scale[:, None, None]
    # Inverse for sampling: p' = R^T (q - c - shift) / s + c.
    inv = rot.transpose(1, 2) / (scale * scale)[:, None, None]
    size = images.shape[-1]
    centres = (torch.arange(size, dtype=torch.float32, device=dev) + 0.5) / size
    gy, gx = torch.meshgrid(centres, centres, indexing="ij")
    q = torch.stack([gx, gy], -1).view(1, -1, 2) - 0.5 - shift[:, None, :]
    p = torch.einsum("nij,nkj->nki", inv, q) + 0.5
    p_x = torch.where(flip[:, None], 1.0 - p[..., 0], p[..., 0])
    grid = torch.stack([p_x, p[..., 1]], -1).view(n, size, size, 2) * 2.0 - 1.0
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    new_landmarks = None
    if landmarks is not None:
        pts = landmarks
        mirrored = torch.stack([1.0 - pts[..., 0], pts[..., 1]], -1)[:, _FLIP.to(dev)]
        pts = torch.where(flip[:, None, None], mirrored, pts)
        new_landmarks = torch.einsum("nij,nkj->nki", rot, pts - 0.5) + 0.5 + shift[:, None, :]

    out = _photometric(out, cfg, gen)
    return out, new_landmarks


def _photometric(images: Tensor, cfg: AugmentSection, gen: torch.Generator) -> Tensor:
    n, _, h, w = images.shape
    dev = images.device

    def rand(*size: int) -> Tensor:
        return torch.rand(size, generator=gen).to(dev)

    gamma = torch.exp((rand(n) * 2 - 1) * cfg.gamma_jitter)[:, None, None, None]
    x = 255.0 * (images.clamp(0, 255) / 255.0) ** gamma

    if cfg.blur_probability > 0:
        factor = 0.35 + 0.4 * rand(n)
        blur_on = rand(n) < cfg.blur_probability
        small = max(8, int(h * 0.5))
        blurred = F.interpolate(
            F.interpolate(x, size=(small, small), mode="bilinear", antialias=True, align_corners=False),
            size=(h, w),
            mode="bilinear",
            align_corners=False,
        )
        mix = (blur_on.float() * factor / 0.75).clamp(0, 1)[:, None, None, None]
        x = x * (1 - mix) + blurred * mix

    if cfg.noise_std > 0:
        x = x + torch.randn(x.shape, generator=gen).to(dev) * (rand(n) * cfg.noise_std)[:, None, None, None]

    if cfg.erase_probability > 0:
        erase_on = rand(n) < cfg.erase_probability
        side_h = (0.15 + 0.25 * rand(n)) * h
        side_w = (0.15 + 0.25 * rand(n)) * w
        y0 = rand(n) * (h - side_h)
        x0 = rand(n) * (w - side_w)
        ys = torch.arange(h, device=dev)[None, :, None].float()
        xs = torch.arange(w, device=dev)[None, None, :].float()
        inside = (
            (ys >= y0[:, None, None])
            & (ys < (y0 + side_h)[:, None, None])
            & (xs >= x0[:, None, None])
            & (xs < (x0 + side_w)[:, None, None])
            & erase_on[:, None, None]
        )
        fill = rand(n)[:, None, None] * 255.0
        x = torch.where(inside[:, None], fill[:, None], x)

    return x.clamp(0, 255)
