"""Seeded, resumable EmotionalDAN training with a masked joint loss.

Every batch holds emotion faces (class label, no landmarks) and landmark
faces (68 points, no class). Each sample contributes only the loss term it
has a label for: cross-entropy on emotion faces, inter-ocular NME of both
stages on landmark faces; ``landmark_weight`` balances the two.

Resuming is exact: the data order of an epoch and the augmentation of a step
are drawn from generators seeded by (seed, epoch) and (seed, step), and the
checkpoint holds the model, weight average, optimiser, schedule, position,
best-so-far and the global random state.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cabin_monitor.datasets import (
    EmotionSet,
    LandmarkSet,
    load_emotion,
    load_landmarks_npz,
    split_by_image,
    subset_emotion,
    subset_landmarks,
)
from cabin_monitor.training.augment import augment_batch
from cabin_monitor.training.config import TrainConfig
from cabin_monitor.training.export import load_onnx_as_torch
from cabin_monitor.training.model import EmotionalDAN, ModelSpec
from cabin_monitor.vision.framing import OUTER_EYE_CORNERS

MEAN_SHAPE_FILE = Path(__file__).with_name("mean_shape_68.json")
CHECKPOINT_LAST = "last.pt"
CHECKPOINT_BEST = "best.pt"


@dataclass(frozen=True)
class Datasets:
    """Everything a run trains and validates on."""

    train: EmotionSet
    val: EmotionSet
    landmarks_train: LandmarkSet | None
    landmarks_holdout: LandmarkSet | None


def load_datasets(cfg: TrainConfig, data_dir: Path) -> Datasets:
    """Read the files named in ``cfg.data`` from ``data_dir``."""
    size = cfg.model.input_size_px
    names = cfg.model.class_names
    cmap = cfg.model.class_map
    train = load_emotion(data_dir / cfg.data.emotion_train, size, cmap, names, cfg.data.max_unknown_votes)
    # Validation keeps every face: accuracy is reported on the whole split, against both label sets.
    val = load_emotion(data_dir / cfg.data.emotion_val, size, cmap, names)
    if cfg.optim.targets == "ferplus" and train.votes is None:
        raise ValueError(f"optim.targets is ferplus, but {cfg.data.emotion_train} has no ferplus_votes")
    if cfg.data.limit_train:
        train = subset_emotion(train, np.arange(min(cfg.data.limit_train, len(train.labels))))
    if cfg.data.limit_val:
        val = subset_emotion(val, np.arange(min(cfg.data.limit_val, len(val.labels))))
    lm_train = lm_hold = None
    if cfg.data.landmarks:
        lm = load_landmarks_npz(data_dir / cfg.data.landmarks, size)
        tr, ho = split_by_image(lm.names, cfg.data.landmark_holdout_fraction, cfg.data.split_seed)
        lm_train, lm_hold = subset_landmarks(lm, tr), subset_landmarks(lm, ho)
    return Datasets(train, val, lm_train, lm_hold)


def default_mean_shape() -> Tensor:
    """The bundled canonical mean shape (300-W training faces), normalised crop units."""
    return torch.tensor(json.loads(MEAN_SHAPE_FILE.read_text()), dtype=torch.float32)


def nme(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean point error divided by the outer-eye-corner distance."""
    a, b = OUTER_EYE_CORNERS
    iod = (target[:, a] - target[:, b]).norm(dim=-1).clamp_min(1e-6)
    per_point: Tensor = (pred - target).norm(dim=-1)
    result: Tensor = per_point.mean(dim=-1) / iod
    return result


def class_weights(counts: np.ndarray, mode: str) -> Tensor:
    """Cross-entropy weights from (soft) class counts, normalised to mean 1 over samples."""
    counts = np.maximum(counts.astype(np.float64), 1.0)
    if mode == "none":
        w = np.ones(len(counts))
    elif mode == "sqrt":
        w = 1.0 / np.sqrt(counts)
    else:
        w = 1.0 / counts
    w = w / (w * counts).sum() * counts.sum()
    return torch.tensor(w, dtype=torch.float32)


class WeightAverage:
    """Exponential moving average of the weights (and a copy of the BatchNorm statistics)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Blend in the current weights; early steps average faster."""
        d = min(self.decay, (1 + step) / (10 + step))
        for avg, cur in zip(self.model.parameters(), model.parameters(), strict=True):
            avg.mul_(d).add_(cur.detach(), alpha=1 - d)
        for avg_b, cur_b in zip(self.model.buffers(), model.buffers(), strict=True):
            avg_b.copy_(cur_b)


def _lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    total = max(1, cfg.optim.epochs * steps_per_epoch)
    warm = int(cfg.optim.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return 0.5 * (1 + math.cos(math.pi * progress)) * 0.99 + 0.01


def training_targets(data: EmotionSet, cfg: TrainConfig) -> Tensor:
    """Soft emotion targets [N,K]: one-hot labels, or FER+ vote shares mixed with the file's own label."""
    k = len(data.class_names)
    onehot = np.eye(k, dtype=np.float32)[data.labels]
    if cfg.optim.targets == "original" or data.votes is None:
        return torch.from_numpy(onehot)
    totals = data.votes.sum(axis=1, keepdims=True)
    shares = data.votes / np.maximum(totals, 1.0)
    alpha = cfg.optim.original_label_weight
    mixed = np.where(totals > 0, alpha * onehot + (1.0 - alpha) * shares, onehot)
    return torch.from_numpy(mixed.astype(np.float32))


def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 autocast is faster than float32 here: CUDA GPUs with bf16, CPUs with AVX-512 BF16 or AMX."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _confusion(pred: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    keep = labels >= 0
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels[keep], pred[keep]), 1)
    return confusion


@torch.no_grad()
def _predict(model: EmotionalDAN, images: np.ndarray, batch: int) -> tuple[np.ndarray, Tensor]:
    device = model.mean_shape.device
    preds, shapes = [], []
    for i in range(0, len(images), batch):
        out = model.forward_all(torch.from_numpy(images[i : i + batch]).to(device).float().unsqueeze(1))
        preds.append(out["logits"].argmax(1).cpu().numpy())
        shapes.append(out["shape2"].float().cpu())
    return np.concatenate(preds), torch.cat(shapes)


@torch.no_grad()
def evaluate_torch(model: EmotionalDAN, data: Datasets, batch: int = 256) -> dict[str, Any]:
    """Validation accuracy (file labels and FER+ majority), class-balanced accuracy, confusion and landmark NME.

    ``selection_metric`` ranks checkpoints: the mean of the two accuracies where
    FER+ votes exist, the file-label accuracy otherwise.
    """
    model.eval()
    k = len(data.val.class_names)
    pred, _ = _predict(model, data.val.images, batch)
    confusion = _confusion(pred, data.val.labels, k)
    acc = float(np.trace(confusion) / max(1, confusion.sum()))
    per_class = np.diag(confusion) / np.maximum(1, confusion.sum(1))
    out: dict[str, Any] = {
        "val_accuracy": acc,
        "val_balanced_accuracy": float(per_class.mean()),
        "val_confusion": confusion.tolist(),
        "selection_metric": acc,
    }
    crowd = data.val.crowd_labels()
    if crowd is not None and (crowd >= 0).any():
        crowd_confusion = _confusion(pred, crowd, k)
        out["val_crowd_accuracy"] = float(np.trace(crowd_confusion) / max(1, crowd_confusion.sum()))
        out["val_crowd_faces"] = int(crowd_confusion.sum())
        out["selection_metric"] = (acc + out["val_crowd_accuracy"]) / 2
    if data.landmarks_holdout is not None and len(data.landmarks_holdout.landmarks):
        _, shapes = _predict(model, data.landmarks_holdout.images, batch)
        out["landmark_nme"] = float(nme(shapes, torch.from_numpy(data.landmarks_holdout.landmarks)).mean())
    return out


def _resume_key(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration minus the settings that only say how long or how fast to run.

    Changing ``epochs`` on resume re-plans the rest of the cosine schedule.
    """
    key = copy.deepcopy(config)
    for name in ("max_steps", "threads", "checkpoint_every_steps", "epochs", "early_stop_patience_epochs"):
        key["optim"].pop(name, None)
    return key


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped a run; ``last.pt`` holds every step done so far."""

    def __init__(self, checkpoint: Path, step: int) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint {checkpoint} (run the same command to resume)")
        self.checkpoint = checkpoint
        self.step = step


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _batches(n_items: int, batch: int, seed: int, epoch: int) -> list[np.ndarray]:
    order = np.random.default_rng([seed, epoch, 17]).permutation(n_items)
    return [order[i : i + batch] for i in range(0, n_items - batch + 1, batch)] or [order]


def _landmark_draws(n_items: int, batch: int, seed: int, step: int) -> np.ndarray:
    return np.random.default_rng([seed, step, 29]).integers(0, n_items, size=batch)


def _widened_head(weights: dict[str, Tensor], own: dict[str, Tensor]) -> dict[str, Tensor]:
    """A features-only emotion head taken into a head that also reads the shape: the feature columns as they
    were, the shape columns zero, so the network starts answering exactly as the one it came from."""
    key = "emotion_head.1.weight"
    old, new = weights.get(key), own.get(key)
    if old is None or new is None or old.shape[0] != new.shape[0] or old.shape[1] >= new.shape[1]:
        return {}
    widened = torch.zeros_like(new)
    widened[:, : old.shape[1]] = old
    return {key: widened}


class Trainer:
    """Owns the model, optimiser and run folder of one training run."""

    def __init__(self, cfg: TrainConfig, data: Datasets, run_dir: Path, device: str = "cpu") -> None:
        self.cfg = cfg
        self.data = data
        self.run_dir = run_dir
        self.device = torch.device(device)
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.optim.threads:
            torch.set_num_threads(cfg.optim.threads)
        torch.manual_seed(cfg.seed)
        mean_shape = (
            torch.from_numpy(data.landmarks_train.landmarks.mean(0))
            if data.landmarks_train is not None and len(data.landmarks_train.landmarks)
            else default_mean_shape()
        )
        self.spec = ModelSpec(
            class_names=cfg.model.class_names,
            width=cfg.model.width,
            input_size=cfg.model.input_size_px,
            dropout=cfg.model.dropout,
            emotion_from_shape=cfg.model.emotion_from_shape,
        )
        self.model = EmotionalDAN(self.spec, mean_shape).to(self.device)
        if cfg.optim.init_from:
            self._init_from(Path(cfg.optim.init_from))
        if cfg.optim.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        params = self._trainable_parameters()
        if cfg.optim.optimizer == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=True, weight_decay=cfg.optim.weight_decay
            )
        else:
            self.opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.steps_per_epoch = len(_batches(len(data.train.labels), cfg.optim.batch_emotion, cfg.seed, 0))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: _lr_factor(s, self.steps_per_epoch, cfg))
        self.ema = WeightAverage(self.model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        # Faces live on the training device as uint8; each step indexes and augments them there.
        self.train_images = torch.from_numpy(data.train.images).to(self.device)
        self.train_targets = training_targets(data.train, cfg).to(self.device)
        lm = data.landmarks_train
        self.landmark_images = torch.from_numpy(lm.images).to(self.device) if lm is not None else None
        self.landmark_points = torch.from_numpy(lm.landmarks).to(self.device) if lm is not None else None
        prior = self.train_targets.mean(0).clamp_min(1e-4)
        self.ce_weights = class_weights(self.train_targets.sum(0).cpu().numpy(), cfg.optim.class_balance).to(
            self.device
        )
        self.logit_offset = cfg.optim.logit_adjust_tau * prior.log()
        self.use_bf16 = bf16_supported(self.device) if cfg.optim.bf16 == "auto" else bool(cfg.optim.bf16)
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best_metric = -1.0
        self.epochs_since_best = 0
        self.history: list[dict[str, Any]] = []
        self.stop_requested = threading.Event()

    def _trainable_parameters(self) -> list[torch.nn.Parameter]:
        if self.cfg.optim.train_only == "emotion_head":
            for p in self.model.parameters():
                p.requires_grad_(False)
            for p in self._head_parameters():
                p.requires_grad_(True)
        return [p for p in self.model.parameters() if p.requires_grad]

    def _head_parameters(self) -> list[torch.nn.Parameter]:
        """The emotion head's weights, with the shape encoder that feeds it where there is one."""
        params = list(self.model.emotion_head.parameters())
        if self.spec.emotion_from_shape:
            params += list(self.model.shape_encoder.parameters())
        return params

    def _init_from(self, path: Path) -> None:
        if path.suffix == ".onnx":
            weights = load_onnx_as_torch(path).to(self.device).state_dict()
        else:
            state = torch.load(path, map_location=self.device, weights_only=False)
            weights = state.get("ema") or state["model"]
        own = self.model.state_dict()
        # An export's logit bias is the class prior it was shipped with, not a weight to train from.
        usable = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape and k != "logit_bias"}
        usable |= _widened_head(weights, own)
        skipped = sorted(set(own) - set(usable))
        self.model.load_state_dict(usable, strict=False)
        print(f"initialised from {path}; not taken: {skipped or 'nothing'}", file=sys.stderr)

    @property
    def eval_model(self) -> EmotionalDAN:
        """The weights that are validated and exported (the average when enabled)."""
        model = self.ema.model if self.ema is not None else self.model
        assert isinstance(model, EmotionalDAN)
        return model

    def state(self) -> dict[str, Any]:
        """Everything needed to resume exactly."""
        return {
            "config": self.cfg.model_dump(mode="json"),
            "spec": self.spec.to_dict(),
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict() if self.ema is not None else None,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_metric": self.best_metric,
            "epochs_since_best": self.epochs_since_best,
            "history": self.history,
            "class_prior": self.train_targets.mean(0).cpu().tolist(),
            "torch_rng": torch.get_rng_state(),
        }

    def resume(self, path: Path) -> None:
        """Load a ``last.pt`` written by this trainer."""
        state = torch.load(path, map_location=self.device, weights_only=False)
        # Re-validating the stored configuration fills in settings added since it was written.
        stored = TrainConfig.model_validate(state["config"]).model_dump(mode="json")
        if _resume_key(stored) != _resume_key(self.cfg.model_dump(mode="json")):
            raise ValueError(f"{path} was written with a different configuration; use a new --out folder")
        self.model.load_weights(state["model"])
        if self.ema is not None and state["ema"] is not None:
            self.eval_model.load_weights(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.best_metric = state["best_metric"]
        self.epochs_since_best = state["epochs_since_best"]
        self.history = state["history"]
        torch.set_rng_state(state["torch_rng"])

    def _loss(self, batch_e: np.ndarray, step: int) -> tuple[Tensor, dict[str, float]]:
        images, pts_aug, target_e = self.batch(batch_e, step)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            out = self.model.forward_all(images)
        return self._loss_of(out, target_e, pts_aug)

    def batch(self, batch_e: np.ndarray, step: int) -> tuple[Tensor, Tensor, Tensor]:
        """The augmented input of one step: emotion faces first, then landmark faces."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        index_e = torch.from_numpy(batch_e).to(self.device)
        images = self.train_images[index_e]
        pts_all = torch.zeros(len(batch_e), 68, 2, device=self.device)
        n_lm = cfg.optim.batch_landmarks if self.landmark_images is not None and len(self.landmark_images) else 0
        if n_lm:
            assert self.landmark_images is not None and self.landmark_points is not None
            pick = torch.from_numpy(_landmark_draws(len(self.landmark_images), n_lm, cfg.seed, step)).to(self.device)
            images = torch.cat([images, self.landmark_images[pick]])
            pts_all = torch.cat([pts_all, self.landmark_points[pick]])
        images, pts_aug = augment_batch(images.float().unsqueeze(1), pts_all, cfg.augment, gen)
        assert pts_aug is not None
        if cfg.optim.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, pts_aug, self.train_targets[index_e]

    def _loss_of(self, out: dict[str, Tensor], target_e: Tensor, pts_aug: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Masked joint loss: soft cross-entropy on emotion faces, inter-ocular NME of both stages on landmark faces."""
        cfg = self.cfg
        n_e = len(target_e)
        logits = out["logits"][:n_e].float()
        ce = F.cross_entropy(
            logits + self.logit_offset,
            target_e,
            weight=self.ce_weights,
            label_smoothing=cfg.optim.label_smoothing,
        )
        loss = ce
        hits = (logits.argmax(1) == target_e.argmax(1)).float().mean()
        stats = {"ce": float(ce.detach()), "acc": float(hits)}
        n_lm = len(pts_aug) - n_e
        if n_lm:
            target = pts_aug[n_e:]
            e1 = nme(out["shape1"][n_e:].float(), target).mean()
            e2 = nme(out["shape2"][n_e:].float(), target).mean()
            loss = loss + cfg.optim.landmark_weight * (e1 + e2)
            stats["nme"] = float(e2.detach())
        stats["loss"] = float(loss.detach())
        return loss, stats

    def _step(self, loss: Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.opt.step()

    def benchmark(self, steps: int, warmup_steps: int = 2) -> dict[str, Any]:
        """Time ``steps`` training steps (after a warm-up) on copies of the weights; returns faces/s and phase shares.

        The phases are the batch (indexing and augmentation), the forward pass
        with the loss, and the backward pass with the optimiser step. Nothing
        is written and the trainer's own weights are left as they were.
        """
        saved = copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.opt.state_dict())
        batches = _batches(len(self.data.train.labels), self.cfg.optim.batch_emotion, self.cfg.seed, 0)
        self.model.train()
        totals = {"data": 0.0, "forward": 0.0, "backward": 0.0}
        faces = 0

        def now() -> float:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return time.perf_counter()

        for i in range(warmup_steps + steps):
            t0 = now()
            images, pts_aug, target_e = self.batch(batches[i % len(batches)], i)
            t1 = now()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                out = self.model.forward_all(images)
            loss, _ = self._loss_of(out, target_e, pts_aug)
            t2 = now()
            self._step(loss)
            t3 = now()
            if i >= warmup_steps:
                totals["data"] += t1 - t0
                totals["forward"] += t2 - t1
                totals["backward"] += t3 - t2
                faces += len(images)
        self.model.load_state_dict(saved[0])
        self.opt.load_state_dict(saved[1])
        seconds = sum(totals.values())
        return {
            "steps": steps,
            "faces": faces,
            "faces_per_s": round(faces / seconds, 1),
            "share": {k: round(v / seconds, 3) for k, v in totals.items()},
            "input_size_px": self.spec.input_size,
            "width": self.spec.width,
            "bf16": self.use_bf16,
            "channels_last": self.cfg.optim.channels_last,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
        }

    def fit(self, progress: bool = True) -> dict[str, Any]:
        """Train until the epochs, ``max_steps`` or early stopping end the run; returns the best metrics."""
        cfg = self.cfg
        bar = _progress(progress)
        while self.epoch < cfg.optim.epochs:
            batches = _batches(len(self.data.train.labels), cfg.optim.batch_emotion, cfg.seed, self.epoch)
            self.model.train()
            if cfg.optim.train_only == "emotion_head":
                self.model.eval()
                self.model.emotion_head.train()
                if self.spec.emotion_from_shape:
                    self.model.shape_encoder.train()
            running: dict[str, float] = {}
            t0 = time.monotonic()
            bar.start(self.epoch, len(batches), self.step_in_epoch)
            for i in range(self.step_in_epoch, len(batches)):
                loss, stats = self._loss(batches[i], self.global_step)
                self._step(loss)
                self.sched.step()
                if self.ema is not None:
                    self.ema.update(self.model, self.global_step)
                self.global_step += 1
                self.step_in_epoch = i + 1
                for k, v in stats.items():
                    running[k] = 0.9 * running.get(k, v) + 0.1 * v
                bar.update(running, float(self.sched.get_last_lr()[0]))
                if self.stop_requested.is_set():
                    bar.close()
                    _save_atomic(self.state(), self.run_dir / CHECKPOINT_LAST)
                    raise TrainingInterrupted(self.run_dir / CHECKPOINT_LAST, self.global_step)
                if self.global_step % cfg.optim.checkpoint_every_steps == 0:
                    _save_atomic(self.state(), self.run_dir / CHECKPOINT_LAST)
                if cfg.optim.max_steps and self.global_step >= cfg.optim.max_steps:
                    break
            bar.close()
            finished_epoch = self.step_in_epoch >= len(batches)
            metrics = evaluate_torch(self.eval_model, self.data)
            record = {
                "epoch": self.epoch,
                "step": self.global_step,
                "seconds": round(time.monotonic() - t0, 1),
                "lr": self.sched.get_last_lr()[0],
                **{f"train_{k}": round(v, 4) for k, v in running.items()},
                **{k: v for k, v in metrics.items() if k != "val_confusion"},
            }
            self.history.append(record)
            print(json.dumps(record), file=sys.stderr, flush=True)
            with (self.run_dir / "history.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if metrics["selection_metric"] > self.best_metric:
                self.best_metric = metrics["selection_metric"]
                self.epochs_since_best = 0
                best = self.state()
                best["metrics"] = metrics
                _save_atomic(best, self.run_dir / CHECKPOINT_BEST)
            elif finished_epoch:
                self.epochs_since_best += 1
            if finished_epoch:
                self.epoch += 1
                self.step_in_epoch = 0
            _save_atomic(self.state(), self.run_dir / CHECKPOINT_LAST)
            if cfg.optim.max_steps and self.global_step >= cfg.optim.max_steps:
                break
            if self.epochs_since_best >= cfg.optim.early_stop_patience_epochs:
                print(f"early stop: no better validation accuracy in {self.epochs_since_best} epochs", file=sys.stderr)
                break
        best_state = torch.load(self.run_dir / CHECKPOINT_BEST, map_location="cpu", weights_only=False)
        return dict(best_state["metrics"])


class _Progress:
    """tqdm bar on a terminal, a log line every 20 steps elsewhere."""

    def __init__(self, use_tqdm: bool) -> None:
        self.use_tqdm = use_tqdm
        self.bar: Any = None
        self.count = 0

    def start(self, epoch: int, total: int, done: int) -> None:
        self.count = done
        self.epoch = epoch
        if self.use_tqdm:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch}", dynamic_ncols=True)
        self.total = total

    def update(self, stats: dict[str, float], lr: float) -> None:
        self.count += 1
        text = {k: f"{v:.3f}" for k, v in stats.items()}
        if self.bar is not None:
            self.bar.set_postfix(text | {"lr": f"{lr:.4f}"}, refresh=False)
            self.bar.update(1)
        elif self.count % 20 == 0 or self.count == self.total:
            print(f"epoch {self.epoch} step {self.count}/{self.total} lr {lr:.4f} {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _progress(enabled: bool) -> _Progress:
    if not enabled:
        return _Progress(False)
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return _Progress(False)
    return _Progress(sys.stderr.isatty())


def train(
    cfg: TrainConfig, data_dir: Path, run_dir: Path, device: str = "cpu", progress: bool = True
) -> dict[str, Any]:
    """Train (or resume, when ``run_dir/last.pt`` exists) and return the best validation metrics."""
    data = load_datasets(cfg, data_dir)
    trainer = Trainer(cfg, data, run_dir, device)
    last = run_dir / CHECKPOINT_LAST
    if last.exists():
        trainer.resume(last)
        print(
            f"resumed {last}: epoch {trainer.epoch}, step {trainer.step_in_epoch}/{trainer.steps_per_epoch}",
            file=sys.stderr,
        )
    (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    with _stop_on_signals(trainer.stop_requested):
        return trainer.fit(progress)


def benchmark(cfg: TrainConfig, data_dir: Path, device: str, steps: int) -> dict[str, Any]:
    """Faces per second of ``steps`` training steps of ``cfg`` (nothing is written)."""
    import tempfile

    data = load_datasets(cfg, data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        return Trainer(cfg, data, Path(tmp), device).benchmark(steps)


@contextlib.contextmanager
def _stop_on_signals(event: threading.Event) -> Iterator[None]:
    """SIGINT/SIGTERM set ``event`` (the loop checkpoints and stops) instead of killing the process mid-step."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda _s, _f: event.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
