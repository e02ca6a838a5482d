"""The ``emotion`` section: the EmotionalDAN ONNX model and its execution providers."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from cabin_monitor.config.base import Strict


class EmotionConfig(Strict):
    """The EmotionalDAN ONNX model and how onnxruntime runs it."""

    model_path: Path | None = Field(
        None,
        description="ONNX file; a bare name that is no file here names a bundled model (emotionaldan-3.onnx);"
        " default: the bundled emotionaldan-7.onnx.",
    )
    providers: tuple[Literal["tensorrt", "cuda", "cpu"], ...] = Field(
        ("cpu",), min_length=1, description="onnxruntime execution providers in order of preference."
    )
    strict_providers: bool = Field(
        False, description="Fail start-up unless the first provider asked for is the one in use."
    )
    intra_op_threads: int = Field(0, ge=0, le=64, description="CPU threads per inference; 0 lets onnxruntime pick.")
    thread_spinning: bool = Field(
        False,
        description="Let onnxruntime's CPU threads spin between inferences: a little lower latency for a"
        " core kept busy while idle (off: the daemon leaves the CPU to the rest of the car).",
    )
    max_faces_per_frame: int = Field(
        3,
        ge=0,
        le=64,
        description="Most faces read per frame; with more occupants in view they are read in turn, the longest"
        " unread first (0: every face on every frame). Three on 2 CPU cores reads five occupants at 18 Hz each"
        " within a 30 fps camera's frame time; a GPU takes more.",
    )
    max_batch: int = Field(8, ge=1, le=64, description="Most faces sent in one inference call.")
    detail_px: int | None = Field(
        None,
        ge=0,
        le=512,
        description="Detail level of the crop the model reads: the face is cut at this many pixels and scaled up"
        " to the model's input, as its training faces were. Default: the model's own (detail_px metadata; 48 for"
        " the bundled models, trained on 48 px FER2013 faces); 0 reads the sharp crop.",
    )
    trt_cache_dir: Path | None = Field(None, description="TensorRT engine cache folder (speeds up later starts).")
    trt_fp16: bool = Field(True, description="Let TensorRT build FP16 engines.")
