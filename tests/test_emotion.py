"""Tests of EmotionalDAN inference on onnxruntime with the bundled exported model."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from cabin_monitor.assets import DEFAULT_EMOTION_MODEL, find_model, sample_path
from cabin_monitor.config import DetectorConfig, EmotionConfig
from cabin_monitor.errors import ModelError
from cabin_monitor.messages import Frame, TrackedFace
from cabin_monitor.vision.align import FaceAligner, grey
from cabin_monitor.vision.detect import create_detector
from cabin_monitor.vision.emotion import EmotionModel, ProviderError, read_metadata_props, trt_profile

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
HAS_TRT = "TensorrtExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def model() -> EmotionModel:
    """The bundled model on the CPU provider."""
    return EmotionModel(EmotionConfig())


def real_crops(model: EmotionModel) -> np.ndarray:
    """Aligned crops of the five faces in the bundled group photo."""
    image = cv2.imread(str(sample_path("multi_face.jpg")))
    det = create_detector(DetectorConfig(type="yunet", min_score=0.5))
    faces = det.detect(Frame(0, 0.0, 0.0, image))
    aligner = FaceAligner(model.input_size)
    return np.stack([aligner.align(grey(image), TrackedFace(f, "o", None)).crop for f in faces])


def test_metadata_gives_classes_and_input_size(model: EmotionModel) -> None:
    """Class names and input size come from the ONNX metadata."""
    meta = model.info.metadata
    assert model.class_names == tuple(json.loads(meta["class_names"]))
    assert model.class_names[0] == "neutral" and len(model.class_names) in (3, 7)
    assert model.input_size == int(meta["input_size"])
    assert model.provider_in_use == "CPUExecutionProvider"


def test_outputs_are_probabilities_and_landmarks_inside_the_crop(model: EmotionModel) -> None:
    """Each face gets a probability vector summing to 1 and 68 points mostly within the crop."""
    probs, points = model.infer(real_crops(model))
    assert probs.shape == (5, len(model.class_names)) and points.shape == (5, 68, 2)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-4)
    inside = (points > -0.1 * model.input_size) & (points < 1.15 * model.input_size)
    assert inside.mean() > 0.95


def test_batched_call_equals_single_calls(model: EmotionModel) -> None:
    """Faces in one batch get the same outputs as one at a time."""
    crops = real_crops(model)
    probs, points = model.infer(crops)
    for i in range(len(crops)):
        p1, l1 = model.infer(crops[i : i + 1])
        assert np.allclose(p1[0], probs[i], atol=1e-4)
        assert np.allclose(l1[0], points[i], atol=1e-2)


def test_batches_larger_than_max_batch_are_split() -> None:
    """More faces than max_batch still come back in order."""
    small = EmotionModel(EmotionConfig(max_batch=2))
    crops = real_crops(small)
    p_split, _ = small.infer(crops)
    p_whole, _ = EmotionModel(EmotionConfig(max_batch=8)).infer(crops)
    assert np.allclose(p_split, p_whole, atol=1e-4)


def test_empty_batch_and_wrong_size(model: EmotionModel) -> None:
    """No faces give empty arrays; crops of the wrong size are refused."""
    probs, points = model.infer(np.zeros((0, model.input_size, model.input_size), np.uint8))
    assert probs.shape == (0, len(model.class_names)) and points.shape == (0, 68, 2)
    with pytest.raises(ValueError, match="crops must be"):
        model.infer(np.zeros((1, 50, 50), np.uint8))


def test_not_a_model_file_is_a_model_error(tmp_path: Path) -> None:
    """A corrupt ONNX file raises ModelError naming the file."""
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(ModelError, match=r"bad\.onnx"):
        EmotionModel(EmotionConfig(model_path=bad))


def test_foreign_onnx_model_is_refused() -> None:
    """Another ONNX model (the bundled YuNet detector) is refused for lack of EmotionalDAN metadata."""
    detector = find_model("detectors/face_detection_yunet_2023mar.onnx")
    with pytest.raises(ModelError, match="not an EmotionalDAN export"):
        EmotionModel(EmotionConfig(model_path=detector))


@pytest.mark.skipif(HAS_TRT, reason="this machine has TensorRT")
def test_strict_providers_refuse_a_missing_gpu() -> None:
    """Asking strictly for TensorRT on a machine without it fails start-up."""
    with pytest.raises(ProviderError, match="tensorrt"):
        EmotionModel(EmotionConfig(providers=("tensorrt", "cpu"), strict_providers=True))


def test_non_strict_providers_fall_back_to_cpu() -> None:
    """Without strict_providers, a missing GPU provider falls back to the next in the list."""
    m = EmotionModel(EmotionConfig(providers=("tensorrt", "cuda", "cpu")))
    expected = (
        "TensorrtExecutionProvider" if HAS_TRT else "CUDAExecutionProvider" if HAS_CUDA else "CPUExecutionProvider"
    )
    assert m.provider_in_use == expected


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA execution provider (onnxruntime-gpu on an NVIDIA machine)")
def test_cuda_provider_matches_cpu(model: EmotionModel) -> None:
    """On a GPU, the CUDA provider runs the model and agrees with the CPU."""
    gpu = EmotionModel(EmotionConfig(providers=("cuda",), strict_providers=True))
    crops = real_crops(model)
    assert np.allclose(gpu.infer(crops)[0], model.infer(crops)[0], atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="no TensorRT execution provider (onnxruntime-gpu with TensorRT)")
def test_tensorrt_provider_matches_cpu(model: EmotionModel, tmp_path: Path) -> None:
    """On a TensorRT machine, the TensorRT provider (FP16) agrees with the CPU to within FP16 error."""
    trt = EmotionModel(EmotionConfig(providers=("tensorrt",), strict_providers=True, trt_cache_dir=tmp_path))
    crops = real_crops(model)
    assert np.abs(trt.infer(crops)[0] - model.infer(crops)[0]).max() < 0.05


def test_default_model_is_the_bundled_one() -> None:
    """With no path configured, the bundled emotionaldan-7.onnx is loaded."""
    assert find_model(DEFAULT_EMOTION_MODEL).name == "emotionaldan-7.onnx"


def test_detail_level_comes_from_the_model_unless_configured(model: EmotionModel) -> None:
    """The crop detail level is the model's detail_px metadata by default; the config overrides it."""
    assert model.detail_px == int(model.info.metadata.get("detail_px", "0"))
    forced = EmotionModel(model.cfg.model_copy(update={"detail_px": 40}))
    assert forced.detail_px == 40


def test_a_bare_model_name_means_a_bundled_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`model_path: emotionaldan-3.onnx` loads the bundled 3-class model wherever the daemon runs from."""
    monkeypatch.chdir(tmp_path)
    model = EmotionModel(EmotionConfig(model_path=Path("emotionaldan-3.onnx")))
    assert model.class_names == ("neutral", "positive", "negative")
    with pytest.raises(ModelError, match="not found"):
        EmotionModel(EmotionConfig(model_path=Path("no-such-model.onnx")))


def test_the_tensorrt_profile_covers_every_batch_the_daemon_sends() -> None:
    """The TensorRT profile spans batch 1 to max_batch at the model's input size, tuned for the usual batch."""
    profile = trt_profile(64, max_batch=8, usual_batch=3)
    assert profile == {
        "trt_profile_min_shapes": "image:1x1x64x64",
        "trt_profile_opt_shapes": "image:3x1x64x64",
        "trt_profile_max_shapes": "image:8x1x64x64",
    }


@pytest.mark.parametrize("name", ["emotionaldan-7.onnx", "emotionaldan-3.onnx"])
def test_metadata_read_from_the_file_matches_onnxruntimes(name: str) -> None:
    """The protobuf reader gives the same metadata as an onnxruntime session, without building one."""
    path = find_model(name)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert read_metadata_props(path) == dict(session.get_modelmeta().custom_metadata_map)
    assert read_metadata_props(path)["input_size"] == "64"


def test_metadata_of_a_file_that_is_no_model_is_an_error(tmp_path: Path) -> None:
    """Random bytes and a truncated model raise ValueError rather than returning made-up metadata."""
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(bytes(range(7, 255)) * 40)
    with pytest.raises(ValueError):
        read_metadata_props(junk)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(find_model("emotionaldan-7.onnx").read_bytes()[:5000])
    with pytest.raises(ValueError):
        read_metadata_props(cut)
