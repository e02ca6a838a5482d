"""EmotionalDAN inference on onnxruntime: canonical crops -> emotion probabilities and 68 landmarks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import structlog

from cabin_monitor.assets import DEFAULT_EMOTION_MODEL, find_model
from cabin_monitor.config import EmotionConfig
from cabin_monitor.errors import ModelError, ModelNotFoundError
from cabin_monitor.messages import FloatArray

INPUT_NAME = "image"
OUTPUT_PROBS = "emotion_probs"
OUTPUT_LANDMARKS = "landmarks"
PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
log = structlog.get_logger("cabin_monitor.vision.emotion")


class ProviderError(ModelError):
    """The execution providers asked for (with strict_providers) are not the ones in use."""


@dataclass(frozen=True)
class ModelInfo:
    """What the ONNX file says about itself."""

    path: Path
    class_names: tuple[str, ...]
    input_size: int
    version: str
    metadata: dict[str, str] = field(repr=False)


def read_model_info(path: Path, session: ort.InferenceSession) -> ModelInfo:
    """Read and check the metadata written by ``cabin-monitor export``."""
    meta = dict(session.get_modelmeta().custom_metadata_map)
    try:
        class_names = tuple(str(c) for c in json.loads(meta["class_names"]))
        input_size = int(meta["input_size"])
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelError(f"{path}: not an EmotionalDAN export (metadata 'class_names'/'input_size' missing)") from exc
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    if INPUT_NAME not in inputs or not {OUTPUT_PROBS, OUTPUT_LANDMARKS} <= outputs:
        raise ModelError(
            f"{path}: expected input '{INPUT_NAME}' and outputs '{OUTPUT_PROBS}', '{OUTPUT_LANDMARKS}'; "
            f"found inputs {sorted(inputs)} and outputs {sorted(outputs)}"
        )
    shape = inputs[INPUT_NAME].shape
    if len(shape) != 4 or shape[1] != 1 or shape[2] != input_size or shape[3] != input_size:
        raise ModelError(f"{path}: input shape {shape} does not match input_size {input_size}")
    return ModelInfo(path, class_names, input_size, meta.get("model_version", "unknown"), meta)


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """A protobuf varint at ``at``: its value and where the next field starts."""
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        shift += 7
        if byte < 0x80:
            return value, at


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each top-level field of a protobuf message; length-delimited values as bytes."""
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(data, at)
            yield number, value
        elif wire == 2:
            length, at = _varint(data, at)
            if at + length > len(data):
                raise ValueError("field runs past the end")
            yield number, data[at : at + length]
            at += length
        elif wire in (1, 5):
            at += 8 if wire == 1 else 4
        else:
            raise ValueError(f"wire type {wire}")


# ModelProto.metadata_props and StringStringEntryProto's key and value (onnx/onnx.proto).
_METADATA_PROPS, _ENTRY_KEY, _ENTRY_VALUE = 14, 1, 2


def read_metadata_props(path: Path) -> dict[str, str]:
    """An ONNX file's ``metadata_props``, read from the protobuf without building a session (the graph is
    skipped, not parsed). Raises ``ValueError`` (or ``OSError``) when the file is not a readable model."""
    props: dict[str, str] = {}
    for number, value in _fields(path.read_bytes()):
        if number == _METADATA_PROPS and isinstance(value, bytes):
            entry = {n: v for n, v in _fields(value) if isinstance(v, bytes)}
            props[entry.get(_ENTRY_KEY, b"").decode()] = entry.get(_ENTRY_VALUE, b"").decode()
    return props


def _input_size_of(path: Path) -> int | None:
    """The crop side an exported model takes, read from its metadata (None if it says nothing usable)."""
    try:
        return int(read_metadata_props(path)["input_size"])
    except (OSError, ValueError, KeyError, UnicodeDecodeError):  # the real session reports a bad file properly
        return None


def trt_profile(input_size: int, max_batch: int, usual_batch: int) -> dict[str, str]:
    """TensorRT optimisation profile covering every batch the daemon sends (1..max_batch).

    Without it TensorRT builds an engine for the first batch size it sees and rebuilds (seconds on
    a Jetson, long enough to trip the watchdog) whenever a frame brings more faces.
    """
    shape = f"1x{input_size}x{input_size}"
    return {
        "trt_profile_min_shapes": f"{INPUT_NAME}:1x{shape}",
        "trt_profile_opt_shapes": f"{INPUT_NAME}:{usual_batch}x{shape}",
        "trt_profile_max_shapes": f"{INPUT_NAME}:{max_batch}x{shape}",
    }


def _provider_list(cfg: EmotionConfig, path: Path) -> list[str | tuple[str, dict[str, Any]]]:
    out: list[str | tuple[str, dict[str, Any]]] = []
    for name in cfg.providers:
        full = PROVIDER_NAMES[name]
        if name == "tensorrt":
            opts: dict[str, Any] = {"trt_fp16_enable": cfg.trt_fp16}
            input_size = _input_size_of(path) if full in ort.get_available_providers() else None
            if input_size is not None:
                usual = min(cfg.max_batch, cfg.max_faces_per_frame or cfg.max_batch)
                opts |= trt_profile(input_size, cfg.max_batch, usual)
            if cfg.trt_cache_dir is not None:
                cfg.trt_cache_dir.mkdir(parents=True, exist_ok=True)
                opts |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cfg.trt_cache_dir)}
            out.append((full, opts))
        else:
            out.append(full)
    return out


def _model_file(configured: Path | None) -> Path:
    """The configured model file; no setting, or a bare name that is no file here, means a bundled model."""
    if configured is None:
        return find_model(DEFAULT_EMOTION_MODEL)
    if len(configured.parts) == 1 and not configured.is_file():
        return find_model(configured.name)
    return configured


class EmotionModel:
    """One onnxruntime session of an exported EmotionalDAN; all faces of a frame go in one call."""

    def __init__(self, cfg: EmotionConfig) -> None:
        self.cfg = cfg
        path = _model_file(cfg.model_path)
        if not path.is_file():
            raise ModelNotFoundError(f"emotion model not found: {path}")
        available = set(ort.get_available_providers())
        requested = _provider_list(cfg, path)
        usable = [p for p in requested if (p[0] if isinstance(p, tuple) else p) in available]
        missing = [n for n in cfg.providers if PROVIDER_NAMES[n] not in available]
        if missing and cfg.strict_providers:
            raise ProviderError(
                f"providers {missing} are not available in this onnxruntime build (available: {sorted(available)})"
            )
        if not usable:
            usable = ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        if cfg.intra_op_threads:
            options.intra_op_num_threads = cfg.intra_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # onnxruntime's pool threads spin between calls by default: at 30 fps that burns a core while idle.
        spin = "1" if cfg.thread_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=usable)
        except Exception as exc:  # onnxruntime raises several unrelated types for a bad file
            raise ModelError(f"{path}: cannot load the ONNX model: {exc}") from exc
        self.info = read_model_info(path, self.session)
        self.providers_requested = list(cfg.providers)
        self.providers_in_use = list(self.session.get_providers())
        self.provider_in_use = self.providers_in_use[0]
        log.info(
            "emotion model loaded",
            path=str(path),
            version=self.info.version,
            classes=list(self.info.class_names),
            providers_requested=self.providers_requested,
            providers_in_use=self.providers_in_use,
        )
        if cfg.strict_providers and self.provider_in_use != PROVIDER_NAMES[cfg.providers[0]]:
            raise ProviderError(f"asked for {cfg.providers[0]} first but onnxruntime runs on {self.provider_in_use}")
        if self.provider_in_use != PROVIDER_NAMES[cfg.providers[0]]:
            log.warning(
                "emotion model not on the preferred provider", preferred=cfg.providers[0], in_use=self.provider_in_use
            )

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in output order, from the model's metadata."""
        return self.info.class_names

    @property
    def input_size(self) -> int:
        """Side of the square grey crop the model takes."""
        return self.info.input_size

    @property
    def detail_px(self) -> int:
        """Detail level crops are brought to before the model reads them (0: as sharp as they come)."""
        if self.cfg.detail_px is not None:
            return self.cfg.detail_px
        try:
            return max(0, int(self.info.metadata.get("detail_px", "0")))
        except ValueError:
            return 0

    def infer(self, crops: np.ndarray) -> tuple[FloatArray, FloatArray]:
        """Probabilities [N,K] and crop-pixel landmarks [N,68,2] for grey crops [N,S,S] (uint8)."""
        n = len(crops)
        k = len(self.class_names)
        if n == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, 68, 2), np.float32)
        s = self.input_size
        if crops.shape[1:] != (s, s):
            raise ValueError(f"crops must be [N,{s},{s}], got {crops.shape}")
        probs, points = [], []
        for i in range(0, n, self.cfg.max_batch):
            batch = crops[i : i + self.cfg.max_batch].astype(np.float32)[:, None]
            p, lm = self.session.run([OUTPUT_PROBS, OUTPUT_LANDMARKS], {INPUT_NAME: batch})
            probs.append(p)
            points.append(lm)
        return np.concatenate(probs).astype(np.float32), np.concatenate(points).astype(np.float32)

    def warm_up(self) -> None:
        """One inference so the first real frame pays no set-up cost."""
        self.infer(np.full((1, self.input_size, self.input_size), 128, np.uint8))
