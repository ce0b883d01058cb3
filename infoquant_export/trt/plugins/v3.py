"""Class-based ``IPluginV3`` plugins and their creators for the ``tensorrt`` / ``tensorrt_rtx`` Python modules.

One generic plugin class per TensorRT module wraps a :class:`PluginSpec`: build-phase methods answer from the spec,
``enqueue`` wraps TensorRT's device buffers as torch tensors (``__cuda_array_interface__``) and runs the spec (the
Triton kernels) on TensorRT's stream. Creators are registered under the ``infoquant`` namespace.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from infoquant_export.trt.plugins.base import DimsBuilder, PluginSpec

TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                "INT8": "int8", "UINT8": "uint8", "INT4": "uint8"}
TYPESTR = {"float32": "<f4", "float16": "<f2", "int32": "<i4", "int64": "<i8", "int8": "|i1", "uint8": "|u1"}


# TensorRT holds raw pointers to the Python plugin objects that create_plugin() and clone() return; if Python frees
# one, the builder corrupts the heap (seen: "malloc_consolidate(): invalid chunk size" while building the tiny model).
# Keep them for the life of the process (a few objects per network layer and build).
_ALIVE: list[Any] = []


class _DeviceBuffer:
    """A raw CUDA pointer with a shape and dtype, viewable by torch through ``__cuda_array_interface__``."""

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: str) -> None:
        self.__cuda_array_interface__ = {"shape": shape, "typestr": TYPESTR[dtype], "data": (int(ptr), False),
                                         "version": 3, "strides": None}


def device_tensor(ptr: int, dims: tuple[int, ...], type_name: str) -> Any:
    """A torch view of a TensorRT buffer; INT4 (two per byte, element 2i in the low nibble) becomes uint8 with the
    last dim halved."""
    import torch

    shape = tuple(int(d) for d in dims)
    if type_name == "INT4":
        shape = (*shape[:-1], shape[-1] // 2)
    dtype = TORCH_DTYPES[type_name]
    if int(np.prod(shape)) == 0 or not ptr:
        return torch.empty(shape, dtype=getattr(torch, dtype), device="cuda")
    if dtype == "bfloat16":  # no typestr for bfloat16: view the float16-sized storage, reinterpret
        return torch.as_tensor(_DeviceBuffer(ptr, shape, "float16"), device="cuda").view(torch.bfloat16)
    return torch.as_tensor(_DeviceBuffer(ptr, shape, dtype), device="cuda")


def field_values(fc: Any) -> dict[str, Any]:
    """PluginFieldCollection -> {name: numpy array}."""
    values = {}
    for f in fc or []:
        data = np.asarray(f.data)
        values[f.name] = data
    return values


def make_plugin_classes(trt: Any, spec: PluginSpec) -> tuple[type, type]:
    """(plugin class, creator class) implementing ``spec`` for the TensorRT module ``trt``."""
    type_names = {getattr(trt.DataType, n): n for n in ("FLOAT", "HALF", "BF16", "INT32", "INT64", "INT8",
                                                         "UINT8", "INT4", "BOOL") if hasattr(trt.DataType, n)}
    field_type = {"int": (trt.PluginFieldType.INT32, np.int32), "float": (trt.PluginFieldType.FLOAT32, np.float32)}

    class Plugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, attrs: dict[str, Any]) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_namespace, self.plugin_version = spec.name, spec.namespace, spec.version
            self.num_outputs = spec.num_outputs
            self.attrs = attrs
            self.num_inputs = 0

        # core / build
        def get_capability_interface(self, _type: Any) -> Any:
            return self

        def clone(self) -> Any:
            other = Plugin(dict(self.attrs))
            other.num_inputs = self.num_inputs
            _ALIVE.append(other)
            return other

        def get_output_data_types(self, input_types: list[Any]) -> list[Any]:
            self.num_inputs = len(input_types)
            names = spec.output_types(self.attrs, [type_names[t] for t in input_types])
            return [getattr(trt.DataType, n) for n in names]

        def get_output_shapes(self, inputs: list[Any], shape_inputs: list[Any], builder: Any) -> list[Any]:
            dims = [[d[i] for i in range(len(d))] for d in inputs]
            out = spec.output_dims(self.attrs, dims, DimsBuilder(builder.constant))
            return [trt.DimsExprs(o) for o in out]

        def supports_format_combination(self, pos: int, in_out: list[Any], num_inputs: int) -> bool:
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR or desc.type not in type_names:
                return False
            types = [type_names.get(io.desc.type, "?") for io in in_out[:pos + 1]]
            return spec.supports(self.attrs, pos, types, num_inputs)

        def configure_plugin(self, inputs: list[Any], outputs: list[Any]) -> None:
            self.num_inputs = len(inputs)

        def get_workspace_size(self, inputs: list[Any], outputs: list[Any]) -> int:
            return 0

        def get_valid_tactics(self) -> list[int]:
            return []

        def set_tactic(self, tactic: int) -> None:
            pass

        # runtime
        def on_shape_change(self, inputs: list[Any], outputs: list[Any]) -> None:
            pass

        def attach_to_context(self, context: Any) -> Any:
            return self.clone()

        def get_fields_to_serialize(self) -> Any:
            return trt.PluginFieldCollection([
                trt.PluginField(f.name, np.array([self.attrs[f.name]], dtype=field_type[f.kind][1]),
                                field_type[f.kind][0]) for f in spec.fields])

        def enqueue(self, input_desc: list[Any], output_desc: list[Any], inputs: list[int], outputs: list[int],
                    workspace: int, stream: int) -> None:
            run_on_stream(spec, self.attrs,
                          [(p, tuple(d.dims), type_names[d.type]) for p, d in zip(inputs, input_desc, strict=True)],
                          [(p, tuple(d.dims), type_names[d.type]) for p, d in zip(outputs, output_desc, strict=True)],
                          stream)

    class Creator(trt.IPluginCreatorV3One):
        def __init__(self) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = spec.name, spec.namespace, spec.version
            self.field_names = trt.PluginFieldCollection([
                trt.PluginField(f.name, np.array([], dtype=field_type[f.kind][1]), field_type[f.kind][0])
                for f in spec.fields])

        def create_plugin(self, name: str, fc: Any, phase: Any) -> Any:
            plugin = Plugin(spec.attrs(field_values(fc)))
            _ALIVE.append(plugin)
            return plugin

    Plugin.__name__ = Plugin.__qualname__ = f"{spec.name}Plugin"
    Creator.__name__ = Creator.__qualname__ = f"{spec.name}PluginCreator"
    return Plugin, Creator


def run_on_stream(spec: PluginSpec, attrs: dict[str, Any], inputs: list[tuple[int, tuple[int, ...], str]],
                  outputs: list[tuple[int, tuple[int, ...], str]], stream: int) -> None:
    """The body of every ``enqueue``: (pointer, dims, type name) buffers -> torch views -> ``spec.run`` on
    ``stream``. Callable without TensorRT (the GPU tests call it with torch-allocated buffers)."""
    import torch

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        spec.run(attrs, [device_tensor(*b) for b in inputs], [device_tensor(*b) for b in outputs])
