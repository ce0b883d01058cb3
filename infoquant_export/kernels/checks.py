"""Input checks and small launch helpers shared by the kernel wrappers (``ops`` re-exports the public names).

Every wrapper validates shapes, dtypes, devices and contiguity and raises :class:`KernelInputError` (a one-line
``UserError``) naming the constraint, before anything is launched. Tensors must all be on one CUDA device, or all
on the CPU when the kernels run in Triton's interpreter.
"""

from __future__ import annotations

import struct

import torch

from infoquant_export.errors import UserError
from infoquant_export.kernels import interpreted

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KernelInputError(UserError):
    """An input the kernels do not support (shape, dtype, device, layout)."""


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _check_device(*tensors: torch.Tensor) -> torch.device:
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise KernelInputError(f"kernel inputs on different devices ({device} and {t.device})",
                                   "move every tensor to one CUDA device")
    if interpreted() and device.type != "cpu":
        raise KernelInputError(f"TRITON_INTERPRET=1 runs kernels on CPU tensors, got {device}",
                               "unset TRITON_INTERPRET to run compiled kernels on the GPU")
    if not interpreted() and device.type != "cuda":
        raise KernelInputError(f"compiled kernels need CUDA tensors, got {device}",
                               "move the tensors to a CUDA device (or set TRITON_INTERPRET=1 before import)")
    return device


def _check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise KernelInputError(f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})",
                               f"pass {name}.contiguous()")


def _check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        raise KernelInputError(f"{name} has dtype {t.dtype}; the kernel takes {', '.join(map(str, allowed))}",
                               f"convert {name} with .to(...)")


def _check_bits(bits: int) -> None:
    if bits not in (4, 8):
        raise KernelInputError(f"the kernels quantize to 4 or 8 bits, not {bits}",
                               "use --a-bits/--kv-bits 4 or 8, or the fake-quant model")


def _f32(value: float) -> float:
    """``value`` rounded to float32 (as the Python float the kernel receives as an fp32 argument)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def device_cc(device: torch.device) -> int | None:
    """Compute capability of a CUDA device as an int (89 for 8.9); None for the CPU (interpreter)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor
