"""Import TensorRT lazily: ``tensorrt`` (data-centre / Jetson) when importable, else TensorRT-RTX from PyPI.

The TensorRT-RTX wheel (``tensorrt-rtx-cu13-libs``) ships ``libtensorrt_rtx.so.1`` but not the unversioned
``libtensorrt_rtx.so`` that its ONNX parser dlopens when a model uses plugins (without it the process aborts). The
fix used here: a symlink next to the library in the wheel's own directory (the parser's RPATH is ``$ORIGIN``), in
the user's Python environment, never a system path. Where that directory is read-only, the CLI re-executes itself
with ``LD_LIBRARY_PATH`` pointing at a private directory holding the symlink; a library caller gets a one-line error
with the same fix.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infoquant_export.errors import UserError

RTX_LIB = "libtensorrt_rtx.so"
FLAVOURS = ("tensorrt", "tensorrt_rtx")
_REEXEC_ENV = "INFOQUANT_TRT_REEXEC"


@dataclass(frozen=True)
class TensorRT:
    """The imported TensorRT Python module and what it is."""

    module: Any
    flavour: str  # "tensorrt" or "tensorrt_rtx"
    version: str

    @property
    def is_rtx(self) -> bool:
        return self.flavour == "tensorrt_rtx"


_LOADED: dict[str, TensorRT] = {}


def private_lib_dir() -> Path:
    from infoquant_export.models.loading import cache_dir

    return cache_dir() / "trt-rtx-lib"


def ensure_rtx_soname(libs_dir: Path, allow_reexec: bool = False) -> None:
    """Make ``libtensorrt_rtx.so`` resolvable for the parser's dlopen (see the module docstring)."""
    target = libs_dir / f"{RTX_LIB}.1"
    link = libs_dir / RTX_LIB
    if link.exists() or not target.exists():
        return
    try:
        tmp = libs_dir / f".{RTX_LIB}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target.name)
        os.replace(tmp, link)
        return
    except OSError:
        pass
    private = private_lib_dir()
    private.mkdir(parents=True, exist_ok=True)
    plink = private / RTX_LIB
    if not plink.exists():
        plink.unlink(missing_ok=True)
        plink.symlink_to(target)
    in_path = str(private) in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)
    if in_path:
        return
    if allow_reexec and not os.environ.get(_REEXEC_ENV):
        env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(
            p for p in (str(private), os.environ.get("LD_LIBRARY_PATH", "")) if p), **{_REEXEC_ENV: "1"})
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    raise UserError(f"TensorRT-RTX's {libs_dir} is read-only and lacks {RTX_LIB} (its ONNX parser needs it)",
                    f"run with LD_LIBRARY_PATH={private} (a symlink to {target} was made there)")


def load_tensorrt(flavour: str | None = None, allow_reexec: bool = False) -> TensorRT:
    """The TensorRT module to use: ``flavour`` (or ``$INFOQUANT_TRT``) forces one; by default ``tensorrt`` when
    importable, else ``tensorrt_rtx``. UserError naming the fix when neither is installed."""
    flavour = flavour or os.environ.get("INFOQUANT_TRT") or None
    if flavour is not None and flavour not in FLAVOURS:
        raise UserError(f"unknown TensorRT flavour {flavour!r}", f"use one of {', '.join(FLAVOURS)}")
    for name in ([flavour] if flavour else list(FLAVOURS)):
        if name in _LOADED:
            return _LOADED[name]
        try:
            if name == "tensorrt":
                module = importlib.import_module("tensorrt")
            else:
                libs = importlib.import_module("tensorrt_rtx_libs")
                ensure_rtx_soname(Path(libs.__file__).parent, allow_reexec)
                module = importlib.import_module("tensorrt_rtx_bindings")
        except ImportError:
            continue
        _LOADED[name] = TensorRT(module, name, str(getattr(module, "__version__", "?")))
        return _LOADED[name]
    wanted = flavour or "tensorrt or tensorrt_rtx"
    raise UserError(f"TensorRT is not installed ({wanted} cannot be imported)",
                    'pip install -e ".[trt-rtx]" (TensorRT-RTX from PyPI) or install TensorRT >= 10.7')


def trt_available() -> bool:
    """Whether any TensorRT flavour imports (without importing it)."""
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("tensorrt", "tensorrt_rtx_bindings"))
