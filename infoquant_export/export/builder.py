"""A thin graph-building layer over ``onnx_ir``.

Why onnx-ir directly (not torch.onnx): the graph is generated from the artifact's tensors and transform schema, not
traced from PyTorch, so every node is placed on purpose (explicit Q/DQ, one custom node per online op, fused QKV and
gate/up GEMMs), and initializers are ``LazyTensor`` objects read from the artifact's safetensors file one at a time
when the model is written. That keeps export memory bounded by one layer instead of the whole model, which a traced
export (which materializes every parameter and the whole graph in PyTorch first) cannot offer. onnx-ir is the IR that
torch.onnx and onnxscript themselves build on, and it writes ONNX local functions (with overloads) natively.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

OPSET = 21
DOMAIN = "infoquant"
DOMAIN_VERSION = 1


class Builder:
    """``b.Add(x, y)``, ``b.Reshape(x, b.ints([0, -1]))``: one method per ONNX op, recorded on a tape."""

    def __init__(self, tape: ir.tape.Tape | None = None) -> None:
        self.tape = tape or ir.tape.Tape()

    def __getattr__(self, op_type: str) -> Callable[..., ir.Value]:
        if not op_type[:1].isupper():
            raise AttributeError(op_type)

        def emit(*inputs: ir.Value | None, _name: str | None = None, _domain: str = "", _overload: str = "",
                 **attributes: Any) -> ir.Value:
            output = ir.Value(name=_name) if _name else None
            return self.tape.op(op_type, list(inputs), attributes or None, domain=_domain, overload=_overload,
                                output=output)

        return emit

    def multi(self, op_type: str, inputs: Sequence[ir.Value | None], num_outputs: int, *, domain: str = "",
              overload: str = "", names: Sequence[str] | None = None, **attributes: Any) -> Sequence[ir.Value]:
        """An op with several outputs."""
        outputs = [ir.Value(name=n) for n in names] if names else None
        if op_type == "Split" and len(inputs) == 1:  # opset >= 18: equal split needs num_outputs
            attributes.setdefault("num_outputs", num_outputs)
        return self.tape.op_multi_out(op_type, list(inputs), attributes or None, num_outputs=num_outputs,
                                      domain=domain, overload=overload, outputs=outputs)

    def const(self, value: Any, dtype: type = np.float32) -> ir.Value:
        """A Constant node holding ``np.asarray(value, dtype)``."""
        return self.Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))

    def ints(self, value: Sequence[int] | int) -> ir.Value:
        return self.const(value, np.int64)

    def ref_float(self, attribute: str) -> ir.Value:
        """A float32 scalar Constant whose value is the calling node's attribute ``attribute``."""
        return self.Constant(value_float=ir.RefAttr("value_float", attribute, ir.AttributeType.FLOAT))


def make_function(name: str, overload: str, inputs: Sequence[str], attributes: dict[str, ir.AttributeType],
                  body: Callable[..., Sequence[ir.Value]], doc: str = "") -> ir.Function:
    """An ``infoquant`` local function: ``body(builder, *input_values)`` returns the output values."""
    values = [ir.Value(name=n) for n in inputs]
    builder = Builder()
    outputs = list(body(builder, *values))
    graph = ir.Graph(values, outputs, nodes=builder.tape.nodes, opset_imports={"": OPSET}, name=f"{name}_{overload}")
    attrs = [ir.Attr(a, t, None) for a, t in attributes.items()]
    function = ir.Function(DOMAIN, name, overload, graph=graph, attributes=attrs)
    function.doc_string = doc
    return function
