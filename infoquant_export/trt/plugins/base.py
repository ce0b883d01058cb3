"""What every infoquant TensorRT plugin shares, independent of the plugin API that exposes it.

A :class:`PluginSpec` holds a custom node's build-time logic (fields, output types and shapes, supported type
combinations) and its run-time computation (:meth:`PluginSpec.run` on torch tensors, which calls the Triton kernels
of ``infoquant_export.kernels`` or, for cases they do not cover, the numerics primitives). The class-based
``IPluginV3`` wrappers (``v3.py``) and the decorator-based ahead-of-time plugins (``aot.py``) both read it, so the
contract of ``infoquant_export/export/ops.py`` is written once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

NAMESPACE = "infoquant"
VERSION = "1"

D = TypeVar("D")  # a dimension expression of whichever API asks (trt.IDimensionExpr, trtp.ShapeExpr, int)

# type names are trt.DataType member names; bytes per element (INT4: two per byte)
ITEM_BITS = {"FLOAT": 32, "HALF": 16, "BF16": 16, "INT32": 32, "INT64": 64, "INT8": 8, "UINT8": 8, "INT4": 4}
FLOATS = ("FLOAT", "HALF")


@dataclass(frozen=True)
class Field:
    """A plugin field (an ONNX node attribute): ``kind`` is "int" or "float"."""

    name: str
    kind: str
    default: float | int | None = None


@dataclass
class DimsBuilder(Generic[D]):
    """Builds output dims in the caller's expression type: ``const(n)`` makes a constant dim."""

    const: Callable[[int], D]


class PluginSpec:
    """Build-time and run-time logic of one custom node (override the class attributes and methods)."""

    name: str = ""
    fields: tuple[Field, ...] = ()
    num_inputs: tuple[int, ...] = (1,)  # accepted input counts (optional trailing inputs)
    num_outputs: int = 1
    version = VERSION
    namespace = NAMESPACE

    # ---- build time ---------------------------------------------------------------------------------------
    def attrs(self, values: dict[str, Any]) -> dict[str, Any]:
        """Validated attribute values: every field present (or defaulted), typed."""
        out: dict[str, Any] = {}
        for f in self.fields:
            if f.name in values:
                raw = np.asarray(values[f.name]).reshape(-1)
                if raw.size != 1:
                    raise ValueError(f"{self.name}: field {f.name} must hold one value, got {raw.size}")
                out[f.name] = int(raw[0]) if f.kind == "int" else float(np.float32(raw[0]))
            elif f.default is not None:
                out[f.name] = f.default
            else:
                raise ValueError(f"{self.name}: missing field {f.name}")
        self.check(out)
        return out

    def check(self, attrs: dict[str, Any]) -> None:
        """Raise ValueError for attribute values the plugin does not support."""

    def type_combinations(self, attrs: dict[str, Any], num_inputs: int) -> list[tuple[str, ...]]:
        """Every supported (inputs..., outputs...) tuple of type names; the first is the reference's."""
        raise NotImplementedError

    def output_types(self, attrs: dict[str, Any], input_types: Sequence[str]) -> list[str]:
        n = len(input_types)
        for combo in self.type_combinations(attrs, n):
            if tuple(combo[:n]) == tuple(input_types):
                return list(combo[n:])
        raise ValueError(f"{self.name}: unsupported input types {list(input_types)}")

    def output_dims(self, attrs: dict[str, Any], inputs: Sequence[Sequence[D]], b: DimsBuilder[D]) -> list[list[D]]:
        raise NotImplementedError

    def supports(self, attrs: dict[str, Any], pos: int, types: Sequence[str], num_inputs: int) -> bool:
        """TensorRT's supports_format_combination on type names (linear format is checked by the caller):
        position ``pos`` may take ``types[pos]`` given ``types[:pos]``."""
        return any(tuple(c[:pos + 1]) == tuple(types[:pos + 1]) for c in self.type_combinations(attrs, num_inputs))

    # ---- run time -------------------------------------------------------------------------------------------
    def run(self, attrs: dict[str, Any], inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
        """Compute the outputs (torch tensors, written in place) from the inputs on the current CUDA stream.
        INT4 tensors arrive as uint8 with the last dim halved (two codes per byte, element 2i in the low nibble)."""
        raise NotImplementedError
