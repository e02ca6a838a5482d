"""Export a trained run (or re-export an exported model) to ONNX with its metadata, and check onnxruntime agrees."""

from __future__ import annotations

import json
import platform
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from cabin_monitor.training.config import TrainConfig
from cabin_monitor.training.model import EmotionalDAN, MirrorAveraged, ModelSpec
from cabin_monitor.vision.framing import TEMPLATE_5

OPSET = 17
PARITY_ATOL = 1e-3


def load_checkpoint_model(path: Path) -> tuple[EmotionalDAN, dict[str, Any]]:
    """The network of a checkpoint (its weight average when it has one), in eval mode, and the raw state."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    spec = ModelSpec.from_dict(state["spec"])
    weights = state.get("ema") or state["model"]
    model = EmotionalDAN(spec, weights["mean_shape"])
    model.load_weights(weights)
    return model.eval(), state


def set_prior_weight(model: EmotionalDAN, class_prior: list[float], weight: float) -> None:
    """Put ``weight`` x log(training class prior) back onto the logits of the inference graph.

    A network trained with a logit-adjusted loss answers as if every class were
    equally common (weight 0); weight 1 restores the training data's prior.
    """
    prior = torch.tensor(class_prior, dtype=torch.float32)
    if prior.shape != model.logit_bias.shape or bool((prior <= 0).any()):
        raise ValueError(f"class prior {class_prior} does not fit the model's {len(model.spec.class_names)} classes")
    model.logit_bias.copy_(weight * prior.log())


def _metadata(model: EmotionalDAN, state: dict[str, Any], version: str, mirror: bool) -> dict[str, str]:
    # Validated again, so settings added since the run was configured carry their defaults.
    cfg = TrainConfig.model_validate(state["config"]).model_dump(mode="json")
    metrics = {k: v for k, v in state.get("metrics", {}).items() if k != "val_confusion"}
    return {
        "format": "cabin-monitor/emotionaldan/1",
        "model_version": version,
        "class_names": json.dumps(list(model.spec.class_names)),
        "class_map": json.dumps(cfg["model"].get("class_map", {})),
        "input_size": str(model.spec.input_size),
        "detail_px": str(cfg["data"].get("emotion_detail_px") or 0),
        "width": str(model.spec.width),
        "spec": json.dumps(model.spec.to_dict()),
        "input": "image: float32 [N,1,S,S], grey levels 0..255, face in the canonical framing",
        "normalisation": "inside the graph: per-image (x - mean(x)) / max(std(x), 1)",
        "outputs": "emotion_probs: float32 [N,K] softmax; landmarks: float32 [N,68,2] crop pixels (iBUG 68)",
        "test_time": "mirror-averaged: each face and its mirror image, answers averaged" if mirror else "single pass",
        "framing_template": json.dumps(TEMPLATE_5.tolist()),
        "framing": "eye centres, nose tip, mouth corners at framing_template x S (cabin_monitor/vision/framing.py)",
        "mean_shape": json.dumps(np.round(model.mean_shape.numpy(), 5).tolist()),
        "training_data": json.dumps(cfg["data"]),
        "training_config": json.dumps(cfg),
        "training_steps": str(state.get("global_step", "")),
        "class_prior": json.dumps(state.get("class_prior")),
        "prior_weight": json.dumps(state.get("prior_weight")),
        "metrics": json.dumps(metrics),
        "data_terms": "Trained on FER2013 and 300-W (AFW, HELEN) research datasets, which carry no licence "
        "for commercial use; retrain on licensed data for production (see models/README.md).",
        "exported_with": f"torch {torch.__version__}, onnx {onnx.__version__}, python {platform.python_version()}",
    }


def export_model(model: EmotionalDAN, state: dict[str, Any], out: Path, version: str, mirror: bool = False) -> Path:
    """Write ``model`` to ``out`` (opset 17, dynamic batch) and verify it with onnxruntime.

    With ``mirror`` the graph reads every face and its mirror image and averages the answers.
    """
    size = model.spec.input_size
    graph: EmotionalDAN | MirrorAveraged = MirrorAveraged(model).eval() if mirror else model
    example = torch.full((2, 1, size, size), 128.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The TorchScript exporter is chosen on purpose: it keeps parameter names as
    # initializer names (see below) and needs no onnxscript.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"cabin_monitor\.training\.export")
    torch.onnx.export(
        graph,
        (example,),
        str(out),
        input_names=["image"],
        output_names=["emotion_probs", "landmarks"],
        dynamic_axes={"image": {0: "batch"}, "emotion_probs": {0: "batch"}, "landmarks": {0: "batch"}},
        opset_version=OPSET,
        dynamo=False,
        # Unfolded, every initializer keeps its PyTorch parameter name, so `explain`
        # can rebuild the network from the ONNX file alone; onnxruntime fuses the
        # BatchNorms into the convolutions when it loads the model anyway.
        do_constant_folding=False,
    )
    proto = onnx.load(str(out))
    for key, value in _metadata(model, state, version, mirror).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "cabin-monitor"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    check_parity(graph, out)
    return out


def check_parity(
    model: EmotionalDAN | MirrorAveraged, path: Path, images: np.ndarray | None = None
) -> dict[str, float]:
    """Largest |PyTorch - onnxruntime| difference on ``images`` (uint8 [N,S,S]); raises when above tolerance."""
    import onnxruntime as ort

    size = model.spec.input_size
    if images is None:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, size=(4, size, size), dtype=np.uint8)
    x = images.astype(np.float32)[:, None]
    with torch.no_grad():
        probs_t, points_t = model(torch.from_numpy(x))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probs_o, points_o = session.run(["emotion_probs", "landmarks"], {"image": x})
    diff = {
        "probs": float(np.abs(probs_o - probs_t.numpy()).max()),
        "landmarks_px": float(np.abs(points_o - points_t.numpy()).max()),
    }
    if diff["probs"] > PARITY_ATOL or diff["landmarks_px"] > 100 * PARITY_ATOL:
        raise RuntimeError(f"{path}: onnxruntime and PyTorch disagree: {diff}")
    return diff


def export_run(
    run_dir: Path,
    out: Path,
    checkpoint: str = "best.pt",
    model_version: str | None = None,
    mirror: bool = False,
    prior_weight: float | None = None,
) -> Path:
    """Export ``run_dir/checkpoint`` to ``out``, with ``prior_weight`` of the class prior put back when given."""
    path = run_dir / checkpoint
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {path}")
    model, state = load_checkpoint_model(path)
    _apply_prior_weight(model, state, prior_weight, str(path))
    version = model_version or f"{run_dir.name}-step{state.get('global_step', 0)}"
    return export_model(model, state, out, version, mirror)


def _apply_prior_weight(model: EmotionalDAN, state: dict[str, Any], weight: float | None, where: str) -> None:
    if weight is None:
        return
    if not state.get("class_prior"):
        raise ValueError(f"{where}: no class prior stored; --prior-weight needs a run trained by this version")
    set_prior_weight(model, state["class_prior"], weight)
    state["prior_weight"] = weight


def reexport_onnx(
    source: Path,
    out: Path,
    model_version: str | None = None,
    mirror: bool = False,
    prior_weight: float | None = None,
) -> Path:
    """Write the weights of an exported model to ``out`` again, e.g. as its mirror-averaged graph.

    The training configuration, metrics and step count come from the source's metadata;
    the model version too unless ``model_version`` is given.
    """
    proto = _read_onnx(source)
    model = _network_from_proto(proto, source)
    meta = {p.key: p.value for p in proto.metadata_props}
    if "training_config" not in meta:
        raise ValueError(f"{source}: no 'training_config' metadata; export it with `cabin-monitor export`")
    state = {
        "config": json.loads(meta["training_config"]),
        "metrics": json.loads(meta.get("metrics", "{}")),
        "global_step": meta.get("training_steps", ""),
        "class_prior": json.loads(meta.get("class_prior", "null")),
        "prior_weight": json.loads(meta.get("prior_weight", "null")),
    }
    _apply_prior_weight(model, state, prior_weight, str(source))
    version = model_version or meta.get("model_version") or source.stem
    return export_model(model, state, out, version, mirror)


def load_onnx_as_torch(path: Path) -> EmotionalDAN:
    """The PyTorch network holding the weights of an exported EmotionalDAN ONNX file."""
    return _network_from_proto(_read_onnx(path), path)


def onnx_metadata(path: Path) -> dict[str, str]:
    """The metadata an exported model carries (classes, detail level, training configuration, ...)."""
    return {p.key: p.value for p in _read_onnx(path).metadata_props}


def _read_onnx(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    try:
        return onnx.load(str(path))
    except DecodeError as exc:
        raise ValueError(f"{path}: not an ONNX model ({exc})") from exc


def _network_from_proto(proto: onnx.ModelProto, path: Path) -> EmotionalDAN:
    meta = {p.key: p.value for p in proto.metadata_props}
    if "spec" not in meta:
        raise ValueError(f"{path}: no 'spec' metadata; export it with `cabin-monitor export`")
    spec = ModelSpec.from_dict(json.loads(meta["spec"]))
    weights = {
        # A mirror-averaged export nests the network under "model.".
        t.name.removeprefix("model."): torch.from_numpy(numpy_helper.to_array(t).copy())
        for t in proto.graph.initializer
    }
    if "mean_shape" not in weights:
        raise ValueError(f"{path}: the mean shape is missing; was it exported with constant folding?")
    model = EmotionalDAN(spec, weights["mean_shape"])
    missing, _ = model.load_state_dict(weights, strict=False)
    # Models exported before the class-prior bias existed have none: it stays at zero.
    real_missing = [k for k in missing if not k.endswith("num_batches_tracked") and k != "logit_bias"]
    if real_missing:
        raise ValueError(f"{path}: weights missing for {real_missing[:5]} ... ({len(real_missing)} in all)")
    return model.eval()
