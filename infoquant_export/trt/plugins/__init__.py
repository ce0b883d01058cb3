"""One module per custom node of the exported ONNX: its plugin's build-time logic and run-time computation."""

from __future__ import annotations

from infoquant_export.trt.plugins.base import NAMESPACE, VERSION, PluginSpec
from infoquant_export.trt.plugins.block_rotation import BlockRotationSpec
from infoquant_export.trt.plugins.hadamard import HadamardSpec
from infoquant_export.trt.plugins.kv_dequantize import KVDequantizeSpec
from infoquant_export.trt.plugins.kv_quantize import KVQuantizeSpec
from infoquant_export.trt.plugins.qlinear import QLinearSpec

SPECS: dict[str, PluginSpec] = {s.name: s for s in (QLinearSpec(), HadamardSpec(), BlockRotationSpec(),
                                                     KVQuantizeSpec(), KVDequantizeSpec())}

__all__ = ["NAMESPACE", "SPECS", "VERSION", "PluginSpec"]
