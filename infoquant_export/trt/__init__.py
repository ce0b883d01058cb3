"""TensorRT integration: the infoquant plugins, engine building and running (TensorRT imported lazily).

Any TensorRT user calls :func:`register_plugins` before parsing an exported ONNX file or deserializing an engine
built from one.
"""

from __future__ import annotations

from typing import Any

from infoquant_export.trt.loader import TensorRT, load_tensorrt, trt_available
from infoquant_export.trt.plugins import NAMESPACE, SPECS

_CREATORS: dict[tuple[str, str], Any] = {}  # the registry keeps raw pointers: hold the Python creators here
_LOGGERS: dict[str, Any] = {}


def logger(trt: TensorRT, verbose: bool = False) -> Any:
    """One ``trt.Logger`` per process and flavour (TensorRT warns when several are created)."""
    if trt.flavour not in _LOGGERS:
        level = trt.module.Logger.VERBOSE if verbose else trt.module.Logger.WARNING
        _LOGGERS[trt.flavour] = trt.module.Logger(level)
    return _LOGGERS[trt.flavour]


def register_plugins(flavour: str | None = None) -> list[str]:
    """Register every infoquant plugin creator (namespace ``infoquant``, version 1) with TensorRT's global plugin
    registry; idempotent. Returns the plugin names."""
    from infoquant_export.trt.plugins.v3 import make_plugin_classes

    trt = load_tensorrt(flavour)
    logger(trt)  # plugin registration logs through the process logger
    registry = trt.module.get_plugin_registry()
    for spec in SPECS.values():
        key = (trt.flavour, spec.name)
        if key in _CREATORS:
            continue
        _, creator_cls = make_plugin_classes(trt.module, spec)
        creator = creator_cls()
        if not registry.register_creator(creator, NAMESPACE):
            raise RuntimeError(f"TensorRT refused to register plugin {NAMESPACE}::{spec.name}")
        _CREATORS[key] = creator
    return list(SPECS)


__all__ = ["TensorRT", "load_tensorrt", "logger", "register_plugins", "trt_available"]
