"""A bf16 index's network as an fp32 ONNX model that rounds like bf16 autocast: queries without torch.

torch's CPU autocast runs convolutions on bf16 inputs and weights, accumulates in fp32 and rounds the output to
bf16; the ops after (activations, residual adds, pooling) then work on bf16 tensors, rounding each result. The
fp32 ONNX model alone misses that rounding (cosine 0.9975 to the index's bf16 rows on the sample photos). This
rewrite rounds every weight and every activation tensor to the nearest bf16 value (round to nearest even: a Cast to
BFLOAT16 and back), so ONNX Runtime computes what autocast computes; measured against torch bf16 on the sample
photos: cosine 0.99998 (efficientnet_lite0). Used only where `cbir.encoders._onnx_query` verifies it (>= 0.9999).
Shape arithmetic (0-d and 1-d tensors, e.g. the padding of TF-style "same" convolutions) is left exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ROUNDED_OPS = frozenset({"Conv", "Add", "Sub", "Mul", "Div", "Clip", "Relu", "Pad", "GlobalAveragePool",
                         "AveragePool", "ReduceMean", "Gemm", "MatMul", "Sigmoid", "HardSigmoid", "HardSwish"})


def bf16_round(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bf16 value (ties to even), still float32."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def emulate(fp32_model: Path, out: Path) -> Path:
    """Write the rounding version of `fp32_model` to `out`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.shape_inference.infer_shapes(onnx.load(str(fp32_model)))
    graph = model.graph
    infos = [*graph.value_info, *graph.input, *graph.output]
    kind = {v.name: (v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim)) for v in infos}
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        if init.data_type == TensorProto.FLOAT and array.size > 1:
            init.CopyFrom(numpy_helper.from_array(bf16_round(array), init.name))
    renamed: dict[str, str] = {}
    nodes = []

    def round_after(name: str) -> None:
        half, back = f"{name}__bf16", f"{name}__rounded"
        nodes.append(helper.make_node("Cast", [name], [half], to=TensorProto.BFLOAT16))
        nodes.append(helper.make_node("Cast", [half], [back], to=TensorProto.FLOAT))
        renamed[name] = back

    round_after(graph.input[0].name)  # autocast casts the picture itself to bf16 for the first convolution
    for node in graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
        nodes.append(node)
        if node.op_type in ROUNDED_OPS:
            for name in node.output:
                if kind.get(name, (0, 0))[0] == TensorProto.FLOAT and kind[name][1] >= 2:
                    round_after(name)
    output = graph.output[0].name
    if output in renamed:
        nodes.append(helper.make_node("Identity", [renamed[output]], ["y_bf16"]))
        graph.output[0].name = "y_bf16"
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(out))
    return out
