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

import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cabin_monitor.framing import OUTER_EYE_CORNERS
from cabin_monitor.training.augment import augment_batch
from cabin_monitor.training.config import TrainConfig
from cabin_monitor.training.data import (
    EmotionSet,
    LandmarkSet,
    load_emotion,
    load_landmarks_npz,
    split_by_image,
    subset_emotion,
    subset_landmarks,
)
from cabin_monitor.training.export import load_onnx_as_torch
from cabin_monitor.training.model import EmotionalDAN, ModelSpec

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
    train = load_emotion(data_dir / cfg.data.emotion_train, size, cmap, names)
    val = load_emotion(data_dir / cfg.data.emotion_val, size, cmap, names)
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


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> Tensor:
    """Cross-entropy weights from class frequencies, normalised to mean 1 over samples."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    counts = np.maximum(counts, 1.0)
    if mode == "none":
        w = np.ones(num_classes)
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


def _to_input(images: np.ndarray, channels_last: bool) -> Tensor:
    x = torch.from_numpy(images).float().unsqueeze(1)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def evaluate_torch(model: EmotionalDAN, data: Datasets, batch: int = 256) -> dict[str, Any]:
    """Validation accuracy, class-balanced accuracy, confusion matrix and landmark NME."""
    model.eval()
    k = len(data.val.class_names)
    confusion = np.zeros((k, k), dtype=np.int64)
    for i in range(0, len(data.val.labels), batch):
        logits = model.forward_all(_to_input(data.val.images[i : i + batch], False))["logits"]
        pred = logits.argmax(1).numpy()
        np.add.at(confusion, (data.val.labels[i : i + batch], pred), 1)
    acc = float(np.trace(confusion) / max(1, confusion.sum()))
    per_class = np.diag(confusion) / np.maximum(1, confusion.sum(1))
    out: dict[str, Any] = {
        "val_accuracy": acc,
        "val_balanced_accuracy": float(per_class.mean()),
        "val_confusion": confusion.tolist(),
    }
    if data.landmarks_holdout is not None and len(data.landmarks_holdout.landmarks):
        errs = []
        for i in range(0, len(data.landmarks_holdout.landmarks), batch):
            res = model.forward_all(_to_input(data.landmarks_holdout.images[i : i + batch], False))
            errs.append(nme(res["shape2"], torch.from_numpy(data.landmarks_holdout.landmarks[i : i + batch])))
        out["landmark_nme"] = float(torch.cat(errs).mean())
    return out


def _resume_key(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration minus the settings that only say how long or how fast to run.

    Changing ``epochs`` on resume re-plans the rest of the cosine schedule.
    """
    key = copy.deepcopy(config)
    for name in ("max_steps", "threads", "checkpoint_every_steps", "epochs", "early_stop_patience_epochs"):
        key["optim"].pop(name, None)
    return key


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _batches(n_items: int, batch: int, seed: int, epoch: int) -> list[np.ndarray]:
    order = np.random.default_rng([seed, epoch, 17]).permutation(n_items)
    return [order[i : i + batch] for i in range(0, n_items - batch + 1, batch)] or [order]


def _landmark_draws(n_items: int, batch: int, seed: int, step: int) -> np.ndarray:
    return np.random.default_rng([seed, step, 29]).integers(0, n_items, size=batch)


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
        self.ce_weights = class_weights(data.train.labels, len(cfg.model.class_names), cfg.optim.class_balance).to(
            self.device
        )
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best_metric = -1.0
        self.epochs_since_best = 0
        self.history: list[dict[str, Any]] = []

    def _trainable_parameters(self) -> list[torch.nn.Parameter]:
        if self.cfg.optim.train_only == "emotion_head":
            for p in self.model.parameters():
                p.requires_grad_(False)
            for p in self.model.emotion_head.parameters():
                p.requires_grad_(True)
        return [p for p in self.model.parameters() if p.requires_grad]

    def _init_from(self, path: Path) -> None:
        if path.suffix == ".onnx":
            weights = load_onnx_as_torch(path).to(self.device).state_dict()
        else:
            state = torch.load(path, map_location=self.device, weights_only=False)
            weights = state.get("ema") or state["model"]
        own = self.model.state_dict()
        usable = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
        skipped = sorted(set(own) - set(usable))
        self.model.load_state_dict(usable, strict=False)
        print(f"initialised from {path}; not taken: {skipped or 'nothing'}", file=sys.stderr)

    @property
    def eval_model(self) -> EmotionalDAN:
        """The weights that are validated and exported (the average when enabled)."""
        return self.ema.model if self.ema is not None else self.model  # type: ignore[return-value]

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
            "torch_rng": torch.get_rng_state(),
        }

    def resume(self, path: Path) -> None:
        """Load a ``last.pt`` written by this trainer."""
        state = torch.load(path, map_location=self.device, weights_only=False)
        if _resume_key(state["config"]) != _resume_key(self.cfg.model_dump(mode="json")):
            raise ValueError(f"{path} was written with a different configuration; use a new --out folder")
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.model.load_state_dict(state["ema"])
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
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        img_e = torch.from_numpy(self.data.train.images[batch_e]).float().unsqueeze(1)
        lab_e = torch.from_numpy(self.data.train.labels[batch_e])
        lm = self.data.landmarks_train
        n_lm = cfg.optim.batch_landmarks if lm is not None and len(lm.landmarks) else 0
        if n_lm:
            assert lm is not None
            pick = _landmark_draws(len(lm.landmarks), n_lm, cfg.seed, step)
            img_l = torch.from_numpy(lm.images[pick]).float().unsqueeze(1)
            pts_l = torch.from_numpy(lm.landmarks[pick])
            images = torch.cat([img_e, img_l])
            pts_all = torch.cat([torch.zeros(len(batch_e), 68, 2), pts_l])
        else:
            images, pts_all = img_e, torch.zeros(len(batch_e), 68, 2)
        images, pts_aug = augment_batch(images, pts_all, cfg.augment, gen)
        assert pts_aug is not None
        images = images.to(self.device)
        if cfg.optim.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.optim.bf16):
            out = self.model.forward_all(images)
        n_e = len(batch_e)
        logits = out["logits"][:n_e].float()
        ce = F.cross_entropy(
            logits, lab_e.to(self.device), weight=self.ce_weights, label_smoothing=cfg.optim.label_smoothing
        )
        loss = ce
        stats = {"ce": float(ce.detach()), "acc": float((logits.argmax(1).cpu() == lab_e).float().mean())}
        if n_lm:
            target = pts_aug[n_e:].to(self.device)
            e1 = nme(out["shape1"][n_e:].float(), target).mean()
            e2 = nme(out["shape2"][n_e:].float(), target).mean()
            loss = loss + cfg.optim.landmark_weight * (e1 + e2)
            stats["nme"] = float(e2.detach())
        stats["loss"] = float(loss.detach())
        return loss, stats

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
            running: dict[str, float] = {}
            t0 = time.monotonic()
            bar.start(self.epoch, len(batches), self.step_in_epoch)
            for i in range(self.step_in_epoch, len(batches)):
                loss, stats = self._loss(batches[i], self.global_step)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
                self.opt.step()
                self.sched.step()
                if self.ema is not None:
                    self.ema.update(self.model, self.global_step)
                self.global_step += 1
                self.step_in_epoch = i + 1
                for k, v in stats.items():
                    running[k] = 0.9 * running.get(k, v) + 0.1 * v
                bar.update(running, float(self.sched.get_last_lr()[0]))
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
            if metrics["val_accuracy"] > self.best_metric:
                self.best_metric = metrics["val_accuracy"]
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
    return trainer.fit(progress)
