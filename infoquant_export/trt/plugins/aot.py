"""Decorator-based ahead-of-time plugins (``tensorrt.plugin``, TensorRT >= 10.9): the engine embeds the kernels'
PTX and runs with no Python (trtexec, Triton Inference Server's TensorRT backend).

NOT YET RUN. No TensorRT >= 10.9 installs here (TensorRT-RTX lacks ``tensorrt.plugin``; data-centre TensorRT is not
on PyPI), so this module is written against the documented API (``trtp.register`` / ``trtp.aot_impl``, read from
the 11.4 wheel's ``plugin/_lib.py``) and only its pure parts are tested. Scope: the registration (shapes and types
from the same :class:`PluginSpec` as the class-based plugins) for every node, and an AOT implementation for the
``Hadamard`` node of power-of-two sizes, whose kernel has the argument order TensorRT's AOT launcher uses
(inputs, scalar arguments, outputs). Open points before it can run: Triton >= 3.3 appends two scratch pointers
(global and profile scratch) to every compiled kernel's parameters, which TensorRT does not pass (compile with
them unused, i.e. no ``tl.device_print``/scratch, and check the PTX parameter list); the W4A4 GEMM, KV and fused
quantize kernels need wrappers with that argument order too, and the weight row sums a workspace or an extra
constant input.
"""

from __future__ import annotations

import inspect
from typing import Any

from infoquant_export.trt.plugins import NAMESPACE, SPECS
from infoquant_export.trt.plugins.base import DimsBuilder, PluginSpec

PY_TYPE = {"int": int, "float": float}


def descriptor_signature(trtp: Any, spec: PluginSpec, num_inputs: int) -> inspect.Signature:
    """``(x0: TensorDesc, ..., field: int|float, ...) -> TensorDesc | tuple`` as ``trtp.register`` inspects it."""
    params = [inspect.Parameter(f"in{i}", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=trtp.TensorDesc)
              for i in range(num_inputs)]
    params += [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=PY_TYPE[f.kind])
               for f in spec.fields]
    ret = trtp.TensorDesc if spec.num_outputs == 1 else tuple[(trtp.TensorDesc,) * spec.num_outputs]
    return inspect.Signature(params, return_annotation=ret)


def _describe(trtp: Any, spec: PluginSpec, num_inputs: int) -> Any:
    def describe(*args: Any) -> Any:
        inputs, values = args[:num_inputs], dict(zip([f.name for f in spec.fields], args[num_inputs:], strict=True))
        attrs = spec.attrs(values)
        dims = spec.output_dims(attrs, [list(x.shape_expr) for x in inputs], DimsBuilder(lambda n: n))
        types = spec.output_types(attrs, [_type_name(x.dtype) for x in inputs])
        outs = [inputs[0].like() for _ in dims]
        for out, d, t in zip(outs, dims, types, strict=True):
            out.shape_expr = trtp.ShapeExprs(len(d))
            for i, e in enumerate(d):
                out.shape_expr[i] = e
            out.dtype = _trt().DataType.__members__[t]
        return outs[0] if len(outs) == 1 else tuple(outs)

    describe.__signature__ = descriptor_signature(trtp, spec, num_inputs)  # type: ignore[attr-defined]
    describe.__name__ = f"{spec.name.lower()}_desc"
    return describe


def _type_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _trt() -> Any:
    import tensorrt

    return tensorrt


def register_aot_plugins() -> list[str]:
    """Register every node's descriptor and the Hadamard AOT implementation with ``tensorrt.plugin``."""
    import tensorrt.plugin as trtp

    names = []
    for spec in SPECS.values():
        trtp.register(f"{NAMESPACE}::{spec.name}")(_describe(trtp, spec, max(spec.num_inputs)))
        names.append(spec.name)
    trtp.aot_impl(f"{NAMESPACE}::Hadamard")(_hadamard_aot(trtp))
    return names


def _hadamard_aot(trtp: Any) -> Any:
    """The FWHT-only Hadamard (K = 1 sizes) as one PTX kernel: grid = rows, one program per row."""

    def hadamard_aot(x: Any, size: int, num_blocks: int, outputs: Any, tactic: int) -> Any:
        from infoquant_export.kernels.aot import hadamard_rows_ptx

        kernel_name, ptx, num_warps, shared = hadamard_rows_ptx(size, num_blocks)
        launch = trtp.KernelLaunchParams()
        launch.grid_x = x.shape_expr.numel() // size
        launch.block_x = 32 * num_warps
        launch.shared_mem = shared
        return kernel_name, ptx, launch, trtp.SymIntExprs(0)

    return hadamard_aot
