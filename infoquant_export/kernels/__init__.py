"""GPU kernels for the online W4A4KV4 ops: checked entry points (``ops``), a kernel-backed decoder (``model``) and
ahead-of-time compilation (``aot``). Kernel sources: ``plugins/infoquant_kernels`` (package ``infoquant_kernels``).

Triton is imported lazily. Without a CUDA device the kernels run in Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1`` is set before the kernels are first imported), which is how the CPU tests run them.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import torch

from infoquant_export.errors import UserError

_MODULES: dict[str, ModuleType] = {}

_LATE = False  # triton was imported (compiled mode) before us on a machine without CUDA
if not torch.cuda.is_available():  # no GPU: the kernels can only run in the interpreter
    _LATE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    os.environ.setdefault("TRITON_INTERPRET", "1")


def interpreted() -> bool:
    """True when the kernels run in Triton's interpreter (CPU tensors) rather than compiled (CUDA tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_module(name: str) -> ModuleType:
    """``infoquant_kernels.<name>``; selects the interpreter first when no CUDA device is present."""
    if name not in _MODULES:
        if _LATE:
            raise UserError("triton was imported before infoquant_export.kernels on a machine without CUDA, so its "
                            "interpreter cannot run the kernels",
                            "set TRITON_INTERPRET=1 in the environment (or import infoquant_export.kernels first)")
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            raise UserError("the W4A4KV4 GPU kernels need the triton package",
                            "pip install 'infoquant-export[gpu]' (or use the fake-quant model)") from exc
        _MODULES[name] = importlib.import_module(f"infoquant_kernels.{name}")
    return _MODULES[name]


def kernels_available(device: torch.device | str) -> bool:
    """Whether the compiled kernels can run on ``device`` (a CUDA device with triton installed)."""
    if torch.device(device).type != "cuda" or interpreted():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
