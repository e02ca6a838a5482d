"""Training configuration: one YAML file, validated strictly."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

EMOTIONS_7 = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Strict):
    """Network shape."""

    width: float = Field(0.25, gt=0.0, le=2.0, description="Channel multiplier; 1.0 = 64-128-256-512.")
    input_size_px: int = Field(112, ge=32, le=256, multiple_of=16, description="Square grey input side.")
    dropout: float = Field(0.4, ge=0.0, lt=1.0, description="Dropout before each FC layer.")
    emotion_from_shape: bool = Field(
        False, description="The emotion head also reads the stage-2 landmarks in the mean-face frame."
    )
    class_names: tuple[str, ...] = Field(EMOTIONS_7, min_length=2, description="Output classes, in order.")
    class_map: dict[str, str] = Field(
        default_factory=dict,
        description="Data class name -> model class name; unmapped data classes keep their name "
        "if it is a model class and are dropped otherwise.",
    )


class DataSection(_Strict):
    """Files under the --data folder."""

    emotion_train: str = Field("fer2013_train.npz", description="Emotion training .npz or class-folder tree.")
    emotion_val: str = Field("fer2013_val.npz", description="Emotion validation .npz or class-folder tree.")
    landmarks: str | None = Field(
        "landmarks68_train.npz", description="68-point landmark .npz; null trains the emotion task alone."
    )
    landmark_holdout_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="Landmark faces held out, by photo.")
    split_seed: int = Field(0, description="Seed of the landmark hold-out split (fixed across runs).")
    limit_train: int | None = Field(None, ge=1, description="Use only the first N emotion training faces.")
    limit_val: int | None = Field(None, ge=1, description="Use only the first N validation faces.")
    emotion_detail_px: int | None = Field(
        48,
        ge=8,
        description="Detail level of the emotion training faces (FER2013: 48 px), written into the export so the"
        " daemon brings sharp camera crops to it; null for training faces as sharp as the camera's.",
    )
    max_unknown_votes: int = Field(
        5,
        ge=1,
        le=10,
        description="Training faces with at least this many of the ten FER+ votes for 'unknown' or 'not a face'"
        " are dropped (files without FER+ votes keep every face).",
    )


class AugmentSection(_Strict):
    """Geometric and photometric augmentation, applied per face."""

    rotate_deg: float = Field(12.0, ge=0.0, le=45.0)
    scale_jitter: float = Field(0.10, ge=0.0, le=0.5, description="Zoom in 1 +- this factor (log-uniform).")
    shift_jitter: float = Field(0.06, ge=0.0, le=0.3, description="Shift up to this fraction of the crop.")
    flip: bool = True
    gamma_jitter: float = Field(0.35, ge=0.0, le=1.0, description="Gamma in exp(+- this).")
    noise_std: float = Field(6.0, ge=0.0, le=50.0, description="Max Gaussian noise, grey levels.")
    blur_probability: float = Field(0.2, ge=0.0, le=1.0, description="Chance of a down/up-sampling blur.")
    erase_probability: float = Field(0.25, ge=0.0, le=1.0, description="Chance of one random occluding patch.")


class OptimSection(_Strict):
    """Optimiser and schedule."""

    epochs: int = Field(40, ge=1)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps in all (smoke runs).")
    batch_emotion: int = Field(128, ge=1)
    batch_landmarks: int = Field(32, ge=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.02, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    warmup_epochs: float = Field(1.0, ge=0.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    targets: Literal["original", "ferplus"] = Field(
        "original",
        description="Emotion targets: the file's own labels, or the FER+ crowd votes mixed with them"
        " (faces without votes keep their own label).",
    )
    original_label_weight: float = Field(
        0.3, ge=0.0, le=1.0, description="With targets: ferplus, the share of the file's own label in each target."
    )
    logit_adjust_tau: float = Field(
        0.0,
        ge=0.0,
        le=2.0,
        description="Logit-adjusted loss: training adds tau * log(class prior) to the logits, so the network's"
        " own logits lean towards a uniform prior by that much (0 = off, 1 = fully balanced).",
    )
    class_balance: Literal["none", "sqrt", "inverse"] = Field(
        "sqrt", description="Cross-entropy class weights from training frequencies."
    )
    landmark_weight: float = Field(5.0, ge=0.0, description="Weight of the inter-ocular NME term.")
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0, description="0 disables the weight average.")
    early_stop_patience_epochs: int = Field(8, ge=1)
    checkpoint_every_steps: int = Field(50, ge=1)
    bf16: bool | Literal["auto"] = Field(
        "auto",
        description="bfloat16 autocast; auto: on CUDA GPUs that support it and on CPUs with AVX-512 BF16 or AMX"
        " (elsewhere bfloat16 is slower than float32).",
    )
    channels_last: bool = True
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; default: all cores.")
    init_from: str | None = Field(
        None,
        description="Checkpoint (.pt) or exported model (.onnx) whose weights start this run"
        " (the emotion head is kept only if it fits).",
    )
    train_only: Literal["all", "emotion_head"] = Field(
        "all", description="emotion_head freezes everything but the emotion head (3-class re-heading)."
    )


class TrainConfig(_Strict):
    """Root of a training configuration file."""

    seed: int = 1
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    augment: AugmentSection = AugmentSection()
    optim: OptimSection = OptimSection()

    @model_validator(mode="after")
    def _classes_consistent(self) -> TrainConfig:
        bad = sorted({v for v in self.model.class_map.values() if v not in self.model.class_names})
        if bad:
            raise ValueError(f"model.class_map targets {bad} are not in model.class_names")
        if len(set(self.model.class_names)) != len(self.model.class_names):
            raise ValueError("model.class_names has duplicates")
        return self


def load_train_config(path: Path) -> TrainConfig:
    """Read and validate a training YAML file."""
    with path.open(encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping")
    return TrainConfig.model_validate(raw)
