"""Tiny ONNX models built with onnx.helper, for tests of how external data is read."""

from __future__ import annotations

from pathlib import Path

import numpy as np

WEIGHTS = np.arange(4, dtype=np.float32)


def tiny_onnx(path: Path, location: str | None = None, write_data: bool = True) -> Path:
    """`logits = input + w` with input [batch, 4]; with `location`, `w` is external data there
    (written beside the model when `write_data`, the folders made), else stored inline."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import set_external_data

    w = numpy_helper.from_array(WEIGHTS, "w")
    if location is not None:
        if write_data:
            data = path.parent / location
            data.parent.mkdir(parents=True, exist_ok=True)
            data.write_bytes(w.raw_data)
        set_external_data(w, location)
        w.ClearField("raw_data")
    graph = helper.make_graph(
        [helper.make_node("Add", ["input", "w"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())  # as is: onnx.save would touch external data
    assert onnx.load(str(path), load_external_data=False).graph.initializer[0].name == "w"
    return path
