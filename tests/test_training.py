"""Tests of the training side: model geometry, augmentation, a tiny run, resume, export, evaluate, explain."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cabin_monitor.assets import sample_path
from cabin_monitor.config import DetectorConfig, EmotionConfig
from cabin_monitor.datasets import load_emotion
from cabin_monitor.messages import Frame, TrackedFace
from cabin_monitor.training.augment import augment_batch
from cabin_monitor.training.config import EMOTIONS_7, AugmentSection, TrainConfig, load_train_config
from cabin_monitor.training.explain import grad_cam
from cabin_monitor.training.export import check_parity, export_run, load_checkpoint_model, load_onnx_as_torch
from cabin_monitor.training.model import (
    EmotionalDAN,
    MirrorAveraged,
    ModelSpec,
    apply_similarity,
    fit_similarity,
    invert_similarity,
)
from cabin_monitor.training.train import Trainer, default_mean_shape, load_datasets, train, training_targets
from cabin_monitor.vision.align import FaceAligner, grey
from cabin_monitor.vision.detect import create_detector
from cabin_monitor.vision.emotion import EmotionModel
from cabin_monitor.vision.framing import FLIP_68

DATA = Path(__file__).resolve().parent / "data"
REPO = Path(__file__).resolve().parent.parent
TINY = load_train_config(DATA / "tiny-train.yaml")


def cli(*args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cabin_monitor ARGS``."""
    return subprocess.run(
        [sys.executable, "-m", "cabin_monitor", *args], capture_output=True, text=True, timeout=timeout_s
    )


def tiny(**optim: object) -> TrainConfig:
    """The tiny config with some optimiser settings changed."""
    return TINY.model_copy(update={"optim": TINY.optim.model_copy(update=optim)})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished six-step run on the test slices."""
    run = tmp_path_factory.mktemp("run")
    train(tiny(max_steps=6), DATA, run, progress=False)
    return run


def test_similarity_fit_inverts_and_limits_scale() -> None:
    """The fitted similarity maps a moved shape back; its inverse undoes it; absurd scales are capped."""
    mean = default_mean_shape()
    angle = torch.tensor(0.2)
    rot = 1.3 * torch.stack([torch.stack([angle.cos(), -angle.sin()]), torch.stack([angle.sin(), angle.cos()])])
    moved = (mean @ rot.T + torch.tensor([0.05, -0.02])).unsqueeze(0)
    a, t = fit_similarity(moved, mean)
    assert torch.allclose(apply_similarity(a, t, moved)[0], mean, atol=1e-5)
    ia, it = invert_similarity(a, t)
    assert torch.allclose(apply_similarity(ia, it, apply_similarity(a, t, moved)), moved, atol=1e-5)
    tiny_shape = (mean - 0.5) * 0.01 + 0.5
    a, _ = fit_similarity(tiny_shape.unsqueeze(0), mean)
    assert math.isclose(float(torch.linalg.det(a[0]).sqrt()), 2.0, rel_tol=1e-4)


def test_network_shapes_and_start_at_the_mean_shape() -> None:
    """An untrained network outputs probabilities and exactly the mean shape (zero-initialised corrections)."""
    spec = ModelSpec(class_names=("a", "b", "c"), width=0.125, input_size=64)
    model = EmotionalDAN(spec, default_mean_shape()).eval()
    probs, points = model(torch.rand(3, 1, 64, 64) * 255)
    assert probs.shape == (3, 3) and points.shape == (3, 68, 2)
    assert torch.allclose(probs.sum(1), torch.ones(3))
    assert torch.allclose(points[0], default_mean_shape() * 64, atol=1e-4)


def test_augmentation_moves_landmarks_with_the_image() -> None:
    """A bright dot drawn at a landmark ends up where the augmented landmark says, flips included."""
    size = 64
    pts = torch.rand(8, 68, 2) * 0.5 + 0.25
    images = torch.zeros(8, 1, size, size)
    for i in range(8):
        x, y = (pts[i, 36] * size).long().tolist()
        images[i, 0, y - 1 : y + 2, x - 1 : x + 2] = 255
        pts[i, 36] = (pts[i, 36] * size).floor() / size + 0.5 / size
    cfg = AugmentSection(gamma_jitter=0, noise_std=0, blur_probability=0, erase_probability=0, rotate_deg=20)
    out, moved = augment_batch(images, pts, cfg, torch.Generator().manual_seed(3))
    assert moved is not None
    for i in range(8):
        ys, xs = np.nonzero(out[i, 0].numpy() > 60)
        centre = np.array([xs.mean() + 0.5, ys.mean() + 0.5]) / size
        # Mirrored faces carry the dot as the other eye corner (point 45).
        candidates = moved[i, [36, 45]].numpy()
        assert np.min(np.linalg.norm(candidates - centre, axis=1)) < 2.0 / size


def test_flip_swaps_left_and_right_points() -> None:
    """With flipping forced, point 36 of the result is the mirror of point 45 of the input."""
    pts = torch.rand(1, 68, 2)
    cfg = AugmentSection(
        rotate_deg=0,
        scale_jitter=0,
        shift_jitter=0,
        gamma_jitter=0,
        noise_std=0,
        blur_probability=0,
        erase_probability=0,
    )
    flipped = None
    for seed in range(20):
        _, out = augment_batch(torch.zeros(1, 1, 16, 16), pts, cfg, torch.Generator().manual_seed(seed))
        assert out is not None
        if not torch.allclose(out, pts):
            flipped = out
            break
    assert flipped is not None
    assert torch.allclose(flipped[0, 36], torch.tensor([1 - pts[0, 45, 0], pts[0, 45, 1]]), atol=1e-6)
    assert FLIP_68[36] == 45


def test_tiny_run_writes_checkpoints_and_history(tiny_run: Path) -> None:
    """A tiny run leaves best/last checkpoints, its config and a history with the joint-task metrics."""
    assert (tiny_run / "best.pt").is_file() and (tiny_run / "last.pt").is_file()
    history = [json.loads(line) for line in (tiny_run / "history.jsonl").read_text().splitlines()]
    assert history and {"val_accuracy", "landmark_nme", "train_ce", "train_nme"} <= set(history[-1])
    assert json.loads((tiny_run / "config.json").read_text())["model"]["width"] == 0.125


def shape_fed(**optim: object) -> TrainConfig:
    """The tiny config with the emotion head reading the stage-2 shape."""
    cfg = tiny(**optim)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"emotion_from_shape": True})})


@pytest.mark.parametrize("config", [tiny, shape_fed], ids=["features", "features and shape"])
def test_interrupted_training_resumes_exactly(tmp_path: Path, config: Callable[..., TrainConfig]) -> None:
    """Three steps, stop, resume to six gives the very weights of six steps straight through."""
    straight, resumed = tmp_path / "a", tmp_path / "b"
    train(config(max_steps=6), DATA, straight, progress=False)
    train(config(max_steps=3), DATA, resumed, progress=False)
    train(config(max_steps=6), DATA, resumed, progress=False)
    a = torch.load(straight / "last.pt", weights_only=False)
    b = torch.load(resumed / "last.pt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 6
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_shape_fed_head_exports_as_trained(tmp_path: Path) -> None:
    """With emotion_from_shape, the mirror-averaged export is rebuilt with the shape encoder and agrees with PyTorch."""
    train(shape_fed(max_steps=2), DATA, tmp_path / "run", progress=False)
    assert any(
        key.startswith("shape_encoder.")
        for key in torch.load(tmp_path / "run" / "last.pt", weights_only=False)["model"]
    )
    path = export_run(tmp_path / "run", tmp_path / "shape.onnx", mirror=True)
    assert load_onnx_as_torch(path).spec.emotion_from_shape
    model = MirrorAveraged(load_checkpoint_model(tmp_path / "run" / "best.pt")[0]).eval()
    assert check_parity(model, path, real_crops(64))["probs"] < 1e-3


def test_shape_fed_head_reads_the_landmarks() -> None:
    """The shape-fed head's answer changes when only the stage-2 shape changes, and never back-propagates into it."""
    spec = ModelSpec(class_names=EMOTIONS_7, width=0.125, input_size=64, dropout=0.0, emotion_from_shape=True)
    model = EmotionalDAN(spec, default_mean_shape()).eval()
    encoder = model.shape_encoder[0]
    assert isinstance(encoder, torch.nn.Linear)
    torch.nn.init.normal_(encoder.weight, std=1.0)
    feat = torch.zeros(1, 256)
    shape = default_mean_shape().unsqueeze(0).clone().requires_grad_(True)
    moved = shape.detach().clone()
    moved[0, 48:68, 1] += 0.05  # the mouth drops
    logits_a = model.emotion_head(model.head_input(feat, shape))
    logits_b = model.emotion_head(model.head_input(feat, moved))
    assert not torch.allclose(logits_a, logits_b)
    logits_a.sum().backward()
    assert shape.grad is None


def test_resume_refuses_a_different_model(tmp_path: Path) -> None:
    """Resuming a run folder with another network configuration is refused."""
    train(tiny(max_steps=2), DATA, tmp_path, progress=False)
    other = TINY.model_copy(update={"model": TINY.model.model_copy(update={"width": 0.25})})
    with pytest.raises(ValueError, match="different configuration"):
        train(other, DATA, tmp_path, progress=False)


def real_crops(size: int) -> np.ndarray:
    """Aligned crops of the real faces in the bundled group photo."""
    image = cv2.imread(str(sample_path("multi_face.jpg")))
    det = create_detector(DetectorConfig(type="yunet", min_score=0.5))
    aligner = FaceAligner(size)
    return np.stack(
        [aligner.align(grey(image), TrackedFace(f, "o", None)).crop for f in det.detect(Frame(0, 0.0, 0.0, image))]
    )


def test_export_matches_pytorch_on_real_faces(tiny_run: Path, tmp_path: Path) -> None:
    """The exported ONNX model loads in the daemon and agrees with PyTorch on real faces."""
    path = export_run(tiny_run, tmp_path / "tiny.onnx", model_version="test")
    model = EmotionModel(EmotionConfig(model_path=path))
    assert model.input_size == 64 and model.info.version == "test"
    torch_model, _ = load_checkpoint_model(tiny_run / "best.pt")
    diff = check_parity(torch_model, path, real_crops(64))
    assert diff["probs"] < 1e-4 and diff["landmarks_px"] < 1e-2
    meta = model.info.metadata
    assert {
        "class_names",
        "input_size",
        "mean_shape",
        "framing_template",
        "normalisation",
        "training_data",
        "metrics",
        "model_version",
    } <= set(meta)
    import onnx

    proto = onnx.load(str(path))
    assert proto.opset_import[0].version >= 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch


def test_explain_rebuilds_the_network_from_onnx_and_maps_the_crop(tiny_run: Path, tmp_path: Path) -> None:
    """Grad-CAM from the ONNX file gives one map per face, crop-sized and in 0..1."""
    path = export_run(tiny_run, tmp_path / "tiny.onnx")
    model = load_onnx_as_torch(path)
    crops = real_crops(64)
    cams, probs = grad_cam(model, crops)
    assert cams.shape == (len(crops), 64, 64)
    assert cams.min() >= 0 and cams.max() <= 1.0 + 1e-6
    assert probs.shape == (len(crops), 7)


def test_explain_command_on_the_bundled_model(tmp_path: Path) -> None:
    """explain writes a heat-map PNG and a non-empty map per face and class, and a mean-by-class panel."""
    out = tmp_path / "cam"
    proc = cli(
        "explain",
        str(sample_path("single_face.jpg")),
        "--out",
        str(out),
        *[arg for name in EMOTIONS_7 for arg in ("--class", name)],
        "--mean-by-class",
        str(DATA / "fer2013_val.npz"),
        "--limit",
        "40",
        timeout_s=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    maps = sorted(out.glob("single_face_face0_*.npy"))
    assert {p.stem.rsplit("_", 1)[1] for p in maps} == set(EMOTIONS_7)
    # Every class shows where it looked; an empty map would come with a warning instead.
    assert all(np.load(p).max() > 0 for p in maps) and "warning" not in proc.stderr
    size = EmotionModel(EmotionConfig()).input_size
    assert np.load(maps[0]).shape == (size, size)
    assert (out / "mean_by_class.png").is_file()


def test_evaluate_command_reports_accuracy_peer_and_nme(tmp_path: Path) -> None:
    """evaluate prints accuracy and the peer side by side, writes the confusion PNG, and scores landmarks."""
    out = tmp_path / "eval"
    proc = cli(
        "evaluate",
        "--model",
        str(REPO / "models" / "emotionaldan-7.onnx"),
        "--data",
        str(DATA / "fer2013_val.npz"),
        "--peer",
        str(REPO / "models" / "peers" / "fer_mini_xception.onnx"),
        "--out",
        str(out),
        timeout_s=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 84
    assert 0 <= report["model"]["accuracy"] <= 1 and 0 <= report["peer"]["accuracy"] <= 1
    assert np.array(report["model"]["confusion"]).sum() == 84
    assert (out / "confusion_model.png").is_file() and (out / "confusion_peer.png").is_file()
    with np.load(DATA / "fer2013_val.npz") as npz:
        votes = npz["ferplus_votes"]
    assert 0 < report["crowd_images"] < 84 == len(votes)
    for who in ("model", "peer"):
        assert np.array(report[who]["crowd"]["confusion"]).sum() == report["crowd_images"]
    assert "FER+ majority labels" in proc.stdout
    proc = cli(
        "evaluate",
        "--model",
        str(REPO / "models" / "emotionaldan-7.onnx"),
        "--data",
        str(DATA / "landmarks68_train.npz"),
        "--detail-px",
        "48",
        timeout_s=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "inter-ocular NME" in proc.stdout and "at 48 px of detail" in proc.stdout


def test_train_command_and_three_class_re_heading(tmp_path: Path) -> None:
    """The train command runs the tiny config; a 3-class model starts from it and trains only its new head."""
    proc = cli(
        "train",
        "--config",
        str(DATA / "tiny-train.yaml"),
        "--data",
        str(DATA),
        "--out",
        str(tmp_path / "seven"),
        "--no-progress",
        timeout_s=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    three = TINY.model_copy(
        update={
            "model": TINY.model.model_copy(
                update={
                    "class_names": ("neutral", "positive", "negative"),
                    "class_map": {
                        "happiness": "positive",
                        "surprise": "positive",
                        "sadness": "negative",
                        "fear": "negative",
                        "disgust": "negative",
                        "anger": "negative",
                    },
                }
            ),
            "optim": TINY.optim.model_copy(
                update={"init_from": str(tmp_path / "seven" / "best.pt"), "train_only": "emotion_head", "max_steps": 3}
            ),
        }
    )
    train(three, DATA, tmp_path / "three", progress=False)
    seven, _ = load_checkpoint_model(tmp_path / "seven" / "best.pt")
    model3, state = load_checkpoint_model(tmp_path / "three" / "best.pt")
    assert model3.spec.class_names == ("neutral", "positive", "negative")
    conv3, conv7 = model3.stage1.features[0], seven.stage1.features[0]
    assert isinstance(conv3, torch.nn.Conv2d) and isinstance(conv7, torch.nn.Conv2d)
    assert torch.equal(conv3.weight, conv7.weight)
    assert state["metrics"]["val_confusion"] and len(state["metrics"]["val_confusion"]) == 3


def test_bad_training_config_is_reported(tmp_path: Path) -> None:
    """A misspelt training setting stops the train command with its path."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  epochz: 3\n")
    proc = cli("train", "--config", str(bad), "--data", str(DATA), "--out", str(tmp_path / "run"), timeout_s=120)
    assert proc.returncode == 2 and "optim.epochz" in proc.stderr


def test_mirror_averaged_export_is_symmetric(tiny_run: Path, tmp_path: Path) -> None:
    """A mirror-averaged export gives a face and its mirror image the same emotions and mirrored landmarks."""
    path = export_run(tiny_run, tmp_path / "mirror.onnx", mirror=True)
    model = EmotionModel(EmotionConfig(model_path=path))
    assert model.info.metadata["test_time"].startswith("mirror-averaged")
    crops = real_crops(64)
    probs, points = model.infer(crops)
    probs_m, points_m = model.infer(crops[:, :, ::-1].copy())
    assert np.allclose(probs, probs_m, atol=1e-4)
    back = np.stack([64 - points_m[..., 0], points_m[..., 1]], -1)[:, FLIP_68]
    assert np.allclose(points, back, atol=1e-2)
    assert load_onnx_as_torch(path).spec.input_size == 64


def test_exported_model_reexports_mirror_averaged(tiny_run: Path, tmp_path: Path) -> None:
    """`export MODEL.onnx --mirror-average` keeps the weights and version and averages face and mirror."""
    single = export_run(tiny_run, tmp_path / "single.onnx", model_version="7.7.7")
    mirror = tmp_path / "mirror.onnx"
    proc = cli("export", str(single), "--out", str(mirror), "--mirror-average", timeout_s=300)
    assert proc.returncode == 0, proc.stderr
    plain, averaged = EmotionModel(EmotionConfig(model_path=single)), EmotionModel(EmotionConfig(model_path=mirror))
    assert averaged.info.metadata["model_version"] == "7.7.7"
    assert averaged.info.metadata["test_time"].startswith("mirror-averaged")
    assert averaged.info.metadata["training_config"] == plain.info.metadata["training_config"]
    crops = real_crops(64)
    expected = (plain.infer(crops)[0] + plain.infer(crops[:, :, ::-1].copy())[0]) / 2
    assert np.allclose(averaged.infer(crops)[0], expected, atol=1e-4)


def test_export_of_a_foreign_onnx_file_is_refused(tmp_path: Path) -> None:
    """Re-exporting an ONNX file that is not an EmotionalDAN export, or not ONNX at all, fails with a clear message."""
    peer = REPO / "models" / "peers" / "fer_mini_xception.onnx"
    proc = cli("export", str(peer), "--out", str(tmp_path / "x.onnx"), timeout_s=120)
    assert proc.returncode == 2 and "no 'spec' metadata" in proc.stderr
    assert not (tmp_path / "x.onnx").exists()
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a model")
    proc = cli("export", str(corrupt), "--out", str(tmp_path / "x.onnx"), timeout_s=120)
    assert proc.returncode == 2 and "not an ONNX model" in proc.stderr


def test_training_starts_from_an_exported_model(tiny_run: Path, tmp_path: Path) -> None:
    """init_from accepts an exported .onnx file and starts from exactly its weights."""
    path = export_run(tiny_run, tmp_path / "start.onnx")
    exported = load_onnx_as_torch(path).state_dict()
    cfg = tiny(init_from=str(path))
    trainer = Trainer(cfg, load_datasets(cfg, DATA), tmp_path / "again")
    started = trainer.model.state_dict()
    for name, weight in exported.items():
        assert torch.equal(started[name], weight), name


def test_a_shape_fed_head_grown_from_an_export_answers_as_it_did(tiny_run: Path, tmp_path: Path) -> None:
    """init_from a features-only export: the shape columns start at zero, so the logits are the export's own."""
    path = export_run(tiny_run, tmp_path / "start.onnx")
    cfg = shape_fed(init_from=str(path))
    grown = Trainer(cfg, load_datasets(cfg, DATA), tmp_path / "again").model.eval()
    original = load_onnx_as_torch(path).eval()
    faces = torch.from_numpy(real_crops(64).astype(np.float32)[:, None])
    with torch.no_grad():
        assert torch.allclose(grown.forward_all(faces)["logits"], original.forward_all(faces)["logits"], atol=1e-5)
    encoder = grown.shape_encoder[0]
    assert isinstance(encoder, torch.nn.Linear) and encoder.weight.abs().sum() > 0  # the shape path is there


def test_ferplus_votes_map_onto_the_model_classes() -> None:
    """FER+ votes land on the model's classes (grouped for the 3-class model) and give a majority label or -1."""
    seven = load_emotion(DATA / "fer2013_train.npz", 64, {}, EMOTIONS_7)
    groups = {"happiness": "positive", "surprise": "positive"} | {
        c: "negative" for c in ("sadness", "fear", "disgust", "anger")
    }
    three = load_emotion(DATA / "fer2013_train.npz", 64, groups, ("neutral", "positive", "negative"))
    assert seven.votes is not None and three.votes is not None
    assert seven.votes.sum(1).max() <= 10
    order = [EMOTIONS_7.index(c) for c in ("happiness", "surprise")]
    assert np.array_equal(three.votes[:, 1], seven.votes[:, order].sum(1))
    crowd = seven.crowd_labels()
    assert crowd is not None
    tied = (seven.votes == seven.votes.max(1, keepdims=True)).sum(1) > 1
    assert (crowd[tied] == -1).all() and (crowd[~tied] == seven.votes[~tied].argmax(1)).all()


def test_faces_most_taggers_call_unknown_are_dropped() -> None:
    """A face with at least max_unknown_votes 'unknown'/'not a face' votes leaves the training set."""
    with np.load(DATA / "fer2013_val.npz") as npz:
        junk = npz["ferplus_votes"][:, 8:].sum(1)
    kept = load_emotion(DATA / "fer2013_val.npz", 64, {}, EMOTIONS_7, max_unknown_votes=5)
    assert len(kept.labels) == int((junk < 5).sum()) < len(junk)


def test_soft_targets_mix_crowd_votes_with_the_original_label() -> None:
    """Targets are distributions: the original label's share plus the vote shares; one-hot without votes."""
    data = load_emotion(DATA / "fer2013_train.npz", 64, {}, EMOTIONS_7)
    assert data.votes is not None
    targets = training_targets(data, tiny(original_label_weight=0.3)).numpy()
    assert np.allclose(targets.sum(1), 1.0, atol=1e-6)
    with_votes = data.votes.sum(1) > 0
    shares = data.votes[with_votes] / data.votes[with_votes].sum(1, keepdims=True)
    onehot = np.eye(7)[data.labels]
    assert np.allclose(targets[with_votes], 0.3 * onehot[with_votes] + 0.7 * shares, atol=1e-6)
    assert np.array_equal(targets[~with_votes], onehot[~with_votes])
    assert np.array_equal(training_targets(data, tiny(targets="original")).numpy(), onehot)


def test_training_batch_is_the_augmentation_of_the_indexed_faces(tmp_path: Path) -> None:
    """The on-device batch is augment_batch of exactly the chosen faces, with their targets, in order."""
    cfg = tiny(batch_landmarks=0)
    data = load_datasets(cfg, DATA)
    trainer = Trainer(cfg, data, tmp_path)
    index = np.array([5, 0, 17, 3])
    images, _, targets = trainer.batch(index, step=7)
    expected, _ = augment_batch(
        torch.from_numpy(data.train.images[index]).float().unsqueeze(1),
        torch.zeros(4, 68, 2),
        cfg.augment,
        torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7),
    )
    assert torch.allclose(images, expected)
    assert torch.equal(targets, training_targets(data.train, cfg)[index])


def test_landmark_faces_keep_their_own_points_in_a_batch(tmp_path: Path) -> None:
    """Without augmentation, each landmark face of a batch arrives with its own 68 points."""
    still = AugmentSection(
        rotate_deg=0,
        scale_jitter=0,
        shift_jitter=0,
        flip=False,
        gamma_jitter=0,
        noise_std=0,
        blur_probability=0,
        erase_probability=0,
    )
    cfg = tiny(batch_landmarks=6).model_copy(update={"augment": still})
    data = load_datasets(cfg, DATA)
    assert data.landmarks_train is not None
    images, points, _ = Trainer(cfg, data, tmp_path).batch(np.arange(4), step=3)
    for image, pts in zip(images[4:, 0], points[4:], strict=True):
        match = np.flatnonzero(np.all(np.isclose(data.landmarks_train.landmarks, pts.numpy(), atol=1e-5), axis=(1, 2)))
        assert len(match) >= 1
        assert np.allclose(image.numpy(), data.landmarks_train.images[match[0]], atol=1e-3)


def test_prior_weight_puts_the_class_prior_back_at_export(tiny_run: Path, tmp_path: Path) -> None:
    """Exported with prior weight 1, answers are the weight-0 answers times the training prior, renormalised."""
    flat = export_run(tiny_run, tmp_path / "flat.onnx", prior_weight=0.0)
    proc = cli("export", str(tiny_run), "--out", str(tmp_path / "prior.onnx"), "--prior-weight", "1", timeout_s=300)
    assert proc.returncode == 0, proc.stderr
    prior = np.array(torch.load(tiny_run / "best.pt", weights_only=False)["class_prior"])
    plain, shifted = (
        EmotionModel(EmotionConfig(model_path=flat)),
        EmotionModel(EmotionConfig(model_path=tmp_path / "prior.onnx")),
    )
    assert json.loads(shifted.info.metadata["prior_weight"]) == 1.0
    crops = real_crops(64)
    expected = plain.infer(crops)[0] * prior
    expected /= expected.sum(1, keepdims=True)
    assert np.allclose(shifted.infer(crops)[0], expected, atol=1e-4)


def test_benchmark_steps_reports_faces_per_second(tmp_path: Path) -> None:
    """`train --benchmark-steps` prints faces/s and the data/forward/backward shares, and writes no run."""
    proc = cli(
        "train", "--config", str(DATA / "tiny-train.yaml"), "--data", str(DATA), "--benchmark-steps", "3", timeout_s=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["faces"] == 3 * (16 + 4) and report["faces_per_s"] > 0
    assert set(report["share"]) == {"data", "forward", "backward"}
    assert abs(sum(report["share"].values()) - 1.0) < 0.01
    assert isinstance(report["bf16"], bool)


def test_sigint_checkpoints_and_the_run_resumes(tmp_path: Path) -> None:
    """SIGINT during training writes last.pt at the current step, exits 130 in one line, and the run resumes."""
    run = tmp_path / "run"
    slow = tmp_path / "slow.yaml"
    slow.write_text((DATA / "tiny-train.yaml").read_text().replace("epochs: 2", "epochs: 200"))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cabin_monitor",
            "train",
            "--config",
            str(slow),
            "--data",
            str(DATA),
            "--out",
            str(run),
            "--no-progress",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not (run / "history.jsonl").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted at step" in err
    step = int(err.split("interrupted at step ")[1].split(";")[0])
    assert torch.load(run / "last.pt", weights_only=False)["global_step"] == step
    cfg = load_train_config(slow)
    trainer = Trainer(cfg, load_datasets(cfg, DATA), run)
    trainer.resume(run / "last.pt")
    assert trainer.global_step == step


def test_int8_model_agrees_with_the_float_model(tmp_path: Path) -> None:
    """The int8 export of the bundled model keeps at least 97 % of its top-1 answers on held-out faces and runs in
    the daemon; a floor it cannot meet leaves no file."""
    out = tmp_path / "emotionaldan-7.int8.onnx"
    proc = cli(
        "quantize",
        str(REPO / "models" / "emotionaldan-7.onnx"),
        "--data",
        str(DATA),
        "--out",
        str(out),
        "--calibration-faces",
        "160",
        "--check-faces",
        "200",
        timeout_s=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["faces"] == 84 and result["top1_agreement"] >= 0.97
    assert result["mean_landmark_diff_px"] < 0.5
    model = EmotionModel(EmotionConfig(model_path=out))
    assert model.info.metadata["precision"] == "int8"
    assert json.loads(model.info.metadata["int8_agreement"])["top1_agreement"] == result["top1_agreement"]
    refused = cli(
        "quantize",
        str(REPO / "models" / "emotionaldan-7.onnx"),
        "--data",
        str(DATA),
        "--out",
        str(tmp_path / "never.onnx"),
        "--calibration-faces",
        "16",
        "--check-faces",
        "50",
        "--min-agreement",
        "1.01",
        timeout_s=600,
    )
    assert refused.returncode == 2 and "nothing written" in refused.stderr
    assert not (tmp_path / "never.onnx").exists()
