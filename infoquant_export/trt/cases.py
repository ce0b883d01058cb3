"""Plugin test cases saved as .npz (numpy only: the GPU machine has no ONNX or ONNX Runtime)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class PluginCase:
    """One node's plugin-side inputs (arrays as TensorRT's buffers hold them, with type names) and ORT's outputs."""

    op_type: str
    node_name: str
    attrs: dict[str, Any]
    inputs: list[tuple[np.ndarray, str]]
    expected: list[np.ndarray]
    output_types: list[str]

    def save(self, path: str | Path) -> None:
        arrays = {f"in{i}": a for i, (a, _) in enumerate(self.inputs)}
        arrays.update({f"out{i}": a for i, a in enumerate(self.expected)})
        meta = {"op_type": self.op_type, "node_name": self.node_name, "attrs": self.attrs,
                "input_types": [t for _, t in self.inputs], "output_types": self.output_types}
        np.savez(path, meta=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> PluginCase:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            n_in, n_out = len(meta["input_types"]), len(meta["output_types"])
            return cls(meta["op_type"], meta["node_name"], meta["attrs"],
                       [(data[f"in{i}"], meta["input_types"][i]) for i in range(n_in)],
                       [data[f"out{i}"] for i in range(n_out)], meta["output_types"])


def logical_dims(array: np.ndarray, type_name: str) -> tuple[int, ...]:
    """The dims TensorRT reports for a buffer (INT4: the unpacked last dim)."""
    shape = tuple(array.shape)
    return (*shape[:-1], shape[-1] * 2) if type_name == "INT4" else shape
