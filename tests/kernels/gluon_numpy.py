"""Run a Gluon kernel's Python body on numpy arrays (Gluon has no interpreter): the logical program, not its code.

Gluon's values do not depend on layouts (a layout places elements in threads; ``convert_layout`` moves them), so
executing the kernel's own source with each ``gl`` op replaced by its numpy meaning checks its indexing, masks,
softmax and merges on the CPU. Layout objects become ``None``, ``convert_layout`` the identity, ``mma_v2`` a float32
matmul. ``inline_asm_elementwise`` is the one op whose meaning depends on the layout (which elements share one asm
call): the caller passes it in (``asm``), written for the kernel's pack grouping, which ``test_aot.py`` checks in
the compiled LLVM IR. Covers the ops ``attention_mma`` and ``quantize_gluon`` use. Also: the PTX model of the
unpacking asm (``run_ptx``: six instructions, exact float16 arithmetic).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np

# --- a model of the PTX instructions the unpacking asm uses --------------------------------------------------------


def _lop3(a: np.ndarray, b: np.ndarray, c: np.ndarray, lut: int) -> np.ndarray:
    out = np.zeros_like(a)
    for i in range(8):  # minterm i = (a bit, b bit, c bit) = (i >> 2, i >> 1, i) & 1
        if lut >> i & 1:
            out |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
    return out


def _prmt(a: np.ndarray, b: np.ndarray, sel: int) -> np.ndarray:
    src = [(a >> np.uint32(8 * i)) & 0xFF for i in range(4)] + [(b >> np.uint32(8 * i)) & 0xFF for i in range(4)]
    out = np.zeros_like(a)
    for i in range(4):
        nib = sel >> (4 * i) & 0xF
        assert nib < 8, "sign-replicating selectors are not modelled"
        out |= src[nib] << np.uint32(8 * i)
    return out


def f16x2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two float16 halves (low, high) of 32-bit registers, as float64."""
    return ((x & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64),
            (x >> np.uint32(16)).astype(np.uint16).view(np.float16).astype(np.float64))


def to_f16x2(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Round each half once to float16 (the operands here are integers < 2^11 and 2^-4: the float64 results are
    exact, so this is the instruction's single rounding)."""
    return (np.asarray(lo).astype(np.float16).view(np.uint16).astype(np.uint32)
            | np.asarray(hi).astype(np.float16).view(np.uint16).astype(np.uint32) << np.uint32(16))


def run_ptx(asm: str, operands: dict[int, np.ndarray], outputs: int) -> list[np.ndarray]:
    """Run the asm block on numpy uint32 arrays: ``$N`` operands, local ``.reg`` registers, immediates."""
    regs: dict[str, np.ndarray] = {f"${n}": np.asarray(v).astype(np.uint32) for n, v in operands.items()}
    shape = next(iter(regs.values())).shape

    def val(tok: str) -> np.ndarray:
        tok = tok.strip()
        return regs[tok] if tok in regs else np.full(shape, int(tok, 0), dtype=np.uint32)

    for line in asm.strip().strip("{}").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        dst, *src = [a.strip() for a in args.split(",")]
        if op == "mov.b32":
            res = val(src[0])
        elif op == "lop3.b32":
            res = _lop3(val(src[0]), val(src[1]), val(src[2]), int(src[3], 0))
        elif op == "shr.u32":
            res = val(src[0]) >> np.uint32(int(src[1], 0))
        elif op == "prmt.b32":
            res = _prmt(val(src[0]), val(src[1]), int(src[2], 0))
        elif op == "sub.rn.f16x2":
            (a0, a1), (b0, b1) = f16x2(val(src[0])), f16x2(val(src[1]))
            res = to_f16x2(a0 - b0, a1 - b1)
        elif op == "fma.rn.f16x2":
            (a0, a1), (b0, b1), (c0, c1) = f16x2(val(src[0])), f16x2(val(src[1])), f16x2(val(src[2]))
            res = to_f16x2(a0 * b0 + c0, a1 * b1 + c1)
        else:
            raise AssertionError(f"instruction {op!r} is not modelled")
        regs[dst] = res
    return [regs[f"${n}"] for n in range(outputs)]


# --- Gluon's ops on numpy -------------------------------------------------------------------------------------------


class Tensor(np.ndarray):
    """A Gluon tensor (or scalar) as a numpy array with ``.to`` and ``.type.layout``. A Python number in an
    operation takes the tensor's type, as in Triton (a float with an integer tensor: float32)."""

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        arrays = [np.asarray(x) for x in inputs if isinstance(x, np.ndarray)]
        dtype = arrays[0].dtype

        def operand(x: Any) -> Any:
            if isinstance(x, np.ndarray):
                return np.asarray(x)
            if isinstance(x, float) and dtype.kind not in "f":
                return np.float32(x)
            if isinstance(x, (int, float)) and not isinstance(x, bool):
                return np.asarray(x, dtype=dtype)
            return x

        result = getattr(ufunc, method)(*[operand(x) for x in inputs], **kwargs)
        return tuple(_t(r) for r in result) if isinstance(result, tuple) else _t(result)

    def to(self, dtype: Any, bitcast: bool = False) -> Tensor:
        a = np.asarray(self)
        return _t(a.view(dtype) if bitcast else a.astype(dtype))

    @property
    def type(self) -> SimpleNamespace:
        return SimpleNamespace(layout=None)


def _t(x: Any) -> Tensor:
    return np.asarray(x).view(Tensor)


class Pointer:
    """A pointer (tensor): a flat numpy buffer and element offsets into it."""

    def __init__(self, buf: np.ndarray, off: Any = 0) -> None:
        self.buf, self.off = buf, off

    def __add__(self, other: Any) -> Pointer:
        return Pointer(self.buf, self.off + np.asarray(other).astype(np.int64))

    __radd__ = __add__

    def to(self, ptype: SimpleNamespace) -> Pointer:
        new = np.dtype(ptype.element_ty)
        assert np.all(np.asarray(self.off) * self.buf.itemsize % new.itemsize == 0)
        return Pointer(self.buf.view(new), np.asarray(self.off) * self.buf.itemsize // new.itemsize)


def _in_bounds(pointer: Pointer, off: np.ndarray) -> np.ndarray:
    """``off`` if every (unmasked) access lies in the buffer: a GPU would fault or read another tensor."""
    if off.size and (off.min() < 0 or off.max() >= pointer.buf.size):
        raise IndexError(f"access at element {int(off.min())}..{int(off.max())} of a buffer of {pointer.buf.size}")
    return off


def _load(pointer: Pointer, mask: Any = None, other: Any = None) -> Tensor:
    off = np.asarray(pointer.off)
    if mask is None:
        return _t(pointer.buf[_in_bounds(pointer, off)])
    off, mask = np.broadcast_arrays(off, np.asarray(mask))
    _in_bounds(pointer, off[mask])
    vals = pointer.buf[np.where(mask, off, 0)]
    return _t(np.where(mask, vals, np.asarray(other).astype(pointer.buf.dtype)))


def _store(pointer: Pointer, value: Any, mask: Any = None) -> None:
    off, value, mask = np.broadcast_arrays(np.asarray(pointer.off), np.asarray(value),
                                           np.ones((), bool) if mask is None else np.asarray(mask))
    pointer.buf[_in_bounds(pointer, off[mask])] = value[mask].astype(pointer.buf.dtype)


def _reduce(inputs: Any, axis: int, combine: Callable[..., Any]) -> Any:
    """``gl.reduce``: ``combine`` folded along ``axis`` in index order (the kernels' combines are exact in any
    order: min / max)."""
    xs = inputs if isinstance(inputs, tuple) else (inputs,)
    acc = tuple(np.take(x, 0, axis=axis) for x in xs)
    for i in range(1, xs[0].shape[axis]):
        acc = combine(*acc, *(np.take(x, i, axis=axis) for x in xs))
        acc = acc if isinstance(acc, tuple) else (acc,)
    acc = tuple(_t(a) for a in acc)
    return acc if isinstance(inputs, tuple) else acc[0]


def _no_asm(*args: Any) -> np.ndarray:
    raise AssertionError("this kernel's inline asm needs an ``asm`` model")


def gl_numpy(num_warps: int, program_id: list[int],
             asm: Callable[[str, list[np.ndarray], int], np.ndarray] = _no_asm) -> SimpleNamespace:
    """A stand-in for ``triton.experimental.gluon.language`` (and for ``triton.language`` in the ``tl`` helpers a
    Gluon kernel calls): ``program_id`` (a list the launcher sets) and ``asm(asm_text, broadcast args, pack)`` ->
    the float16 output tensor. ``fma`` is not modelled (a float64 product and sum would round twice): run the
    kernels with their division by the scale as ``div_rn`` (``FAST_DIV=False``)."""
    layout = lambda *args, **kwargs: None  # noqa: E731
    return SimpleNamespace(
        float16=np.float16, float32=np.float32, int32=np.int32, int64=np.int64, uint8=np.uint8, uint16=np.uint16,
        uint32=np.uint32, int8=np.int8,
        pointer_type=lambda ty: SimpleNamespace(element_ty=ty),
        SliceLayout=layout, DotOperandLayout=layout, NVMMADistributedLayout=layout, BlockedLayout=layout,
        num_warps=lambda: num_warps, program_id=lambda axis: _t(np.int64(program_id[axis])),
        arange=lambda start, end, layout=None: _t(np.arange(start, end, dtype=np.int32)),
        full=lambda shape, value, dtype, layout=None: _t(np.full(shape, value, dtype)),
        zeros=lambda shape, dtype, layout=None: _t(np.zeros(shape, dtype)),
        load=_load, store=_store,
        expand_dims=lambda x, axis: _t(np.expand_dims(x, axis)),
        reshape=lambda x, shape: _t(np.reshape(x, shape)),
        permute=lambda x, dims: _t(np.transpose(x, tuple(dims))),
        split=lambda x: (_t(x[..., 0]), _t(x[..., 1])), join=lambda a, b: _t(np.stack([a, b], axis=-1)),
        static_range=range, reduce=_reduce, cdiv=lambda a, b: (a + b - 1) // b, thread_barrier=lambda: None,
        div_rn=lambda a, b: _t(np.asarray(a, np.float32) / np.asarray(b, np.float32)),
        convert_layout=lambda x, layout, assert_trivial=False: x,
        minimum=lambda a, b: _t(np.minimum(a, b)), maximum=lambda a, b: _t(np.maximum(a, b)),
        where=lambda c, a, b: _t(np.where(c, a, np.asarray(b, dtype=np.asarray(a).dtype))),
        exp2=lambda x: _t(np.exp2(x)),
        max=lambda x, axis: _t(np.max(x, axis=axis)), sum=lambda x, axis: _t(np.sum(x, axis=axis)),
        inline_asm_elementwise=lambda text, constraints, args, dtype, is_pure, pack: _t(
            asm(getattr(text, "value", text), list(np.broadcast_arrays(*[np.asarray(a) for a in args])), pack)),
    )


def mma_numpy(a: np.ndarray, b: np.ndarray, acc: np.ndarray) -> Tensor:
    """mma.sync on float16 operands: products exact in float32, float32 sums (in numpy's order)."""
    return _t((np.asarray(a, np.float32) @ np.asarray(b, np.float32) + acc).astype(np.float32))


def on_numpy(module: ModuleType, name: str, gl: SimpleNamespace, **replace: Any) -> Callable[..., Any]:
    """``module.name``'s Python body with ``gl`` and ``replace`` in its globals, and every Gluon function of the
    module it calls run the same way."""
    env = dict(vars(module), gl=gl, **replace)
    for key, obj in vars(module).items():
        fn = getattr(obj, "fn", None)
        if isinstance(fn, types.FunctionType):
            env[key] = types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__, fn.__closure__)
    return env[name]


# --- Hopper's asynchronous ops as a sequential protocol model -------------------------------------------------------


class ProtocolError(AssertionError):
    """A barrier wait that would never return, or a buffer written while an asynchronous op still reads it."""


class _Barrier:
    def __init__(self) -> None:
        self.live, self.count, self.done, self.pending, self.tx, self.waits = False, 0, 0, 0, 0, 0

    def arrive(self, tx: int = 0) -> None:
        self.pending, self.tx = self.pending - 1, self.tx + tx
        self._settle()

    def complete_tx(self, nbytes: int) -> None:
        self.tx -= nbytes
        self._settle()

    def _settle(self) -> None:
        if self.pending == 0 and self.tx == 0:
            self.done, self.pending = self.done + 1, self.count


class _Barriers:
    """``allocate_shared_memory(int64, [n, ...], MBarrierLayout())``; used directly it is its first barrier."""

    def __init__(self, n: int) -> None:
        self.bars = [_Barrier() for _ in range(n)]

    def index(self, i: Any) -> _Barrier:
        return self.bars[int(i)]


def _bar(b: Any) -> _Barrier:
    return b.bars[0] if isinstance(b, _Barriers) else b


class _Smem:
    """A shared-memory buffer (or a view of one: ``index`` / ``permute``)."""

    def __init__(self, array: np.ndarray, model: HopperModel, key: tuple = (), transposed: bool = False) -> None:
        self.base, self.model, self.key, self.transposed = array, model, key, transposed

    @property
    def array(self) -> np.ndarray:
        a = self.base[self.key] if self.key else self.base
        return a.T if self.transposed else a

    def index(self, i: Any) -> _Smem:
        return _Smem(self.base, self.model, (int(i),), self.transposed)

    def permute(self, dims: Any) -> _Smem:
        assert tuple(dims) == (1, 0)
        return _Smem(self.base, self.model, self.key, not self.transposed)

    def ident(self) -> tuple:
        return id(self.base), self.key

    def load(self, layout: Any = None) -> Tensor:
        return _t(self.array.copy())

    def store(self, value: Any) -> None:
        self.model.check_write(self)
        self.array[...] = np.asarray(value).astype(self.base.dtype)


class HopperModel:
    """mbarrier / TMA / warpgroup MMA run in program order, with the checks that order would need on the GPU:
    - a barrier wait returns only if the phase it waits for has completed (its copies were issued: here copies
      complete at once), and it must be the next phase of that barrier (a later one would mean a newer load already
      landed in the buffer the consumer reads);
    - no TMA load into, and no store to, a buffer that an MMA group not yet retired reads, or that a TMA store not
      yet waited for reads;
    - every expected byte count equals the bytes of the copies counted on it; nothing in flight at the end."""

    MBAR = object()

    def __init__(self) -> None:
        self.groups: list[set] = []          # the shared buffers each unretired MMA group reads
        self.stores: set = set()             # shared buffers of TMA stores not yet waited for
        model = self

        class mbarrier:  # noqa: N801 (Gluon's module name)
            MBarrierLayout = staticmethod(lambda: HopperModel.MBAR)

            @staticmethod
            def init(b: Any, count: int) -> None:
                b = _bar(b)
                assert not b.live, "barrier initialised twice"
                b.live, b.count, b.pending = True, count, count

            @staticmethod
            def expect(b: Any, nbytes: int) -> None:
                _bar(b).arrive(int(nbytes))

            @staticmethod
            def wait(b: Any, phase: Any) -> None:
                b = _bar(b)
                if not b.live:
                    raise ProtocolError("wait on a barrier that is not initialised")
                if (b.done & 1) == int(phase):
                    raise ProtocolError(f"wait(phase {int(phase)}) would never return: {b.done} phases completed")
                if b.done != b.waits + 1:
                    raise ProtocolError(f"wait {b.waits} of a barrier found {b.done} completed phases: a newer load "
                                        "already landed in the buffer")
                b.waits += 1

            @staticmethod
            def invalidate(b: Any) -> None:
                b = _bar(b)
                if b.tx or b.pending != b.count:
                    raise ProtocolError("barrier invalidated with a phase in progress")
                b.live = False

        class tma:  # noqa: N801
            @staticmethod
            def async_copy_global_to_shared(desc: Any, coords: Any, b: Any, dest: _Smem) -> None:
                model.check_write(dest)
                r, c = (int(x) for x in coords)
                block = np.zeros(desc.block_type.shape, desc.base.dtype)
                part = desc.base[r:r + block.shape[0], c:c + block.shape[1]]
                block[:part.shape[0], :part.shape[1]] = part
                dest.array[...] = block
                _bar(b).complete_tx(desc.block_type.nbytes)

            @staticmethod
            def async_copy_shared_to_global(desc: Any, coords: Any, src: _Smem) -> None:
                r, c = (int(x) for x in coords)
                part = desc.base[r:r + src.array.shape[0], c:c + src.array.shape[1]]
                part[...] = src.array[:part.shape[0], :part.shape[1]]
                model.stores.add(src.ident())

            @staticmethod
            def store_wait(pendings: int) -> None:
                assert pendings == 0
                model.stores.clear()

        def warpgroup_mma(a: _Smem, b: _Smem, acc: Any, use_acc: Any = True, is_async: bool = False) -> Tensor:
            # integer products summed exactly: float64 (BLAS) holds every partial sum of int8 x int8 over K < 2^37
            prod = (a.array.astype(np.float64) @ b.array.astype(np.float64)).astype(np.int64)
            out = prod + (np.asarray(acc) if use_acc else 0)
            model.groups.append({a.ident(), b.ident()})
            return _t(out.astype(np.asarray(acc).dtype))

        def warpgroup_mma_wait(num_outstanding: int = 0, deps: tuple = ()) -> Any:
            del model.groups[:max(len(model.groups) - num_outstanding, 0)]
            return deps[0] if len(deps) == 1 else tuple(deps)

        self.replace = dict(mbarrier=mbarrier, tma=tma, warpgroup_mma=warpgroup_mma,
                            warpgroup_mma_wait=warpgroup_mma_wait, fence_async_shared=lambda: None)

    def check_write(self, dest: _Smem) -> None:
        if any(dest.ident() in g for g in self.groups):
            raise ProtocolError(f"buffer {dest.key} written while an MMA group not yet retired reads it")
        if dest.ident() in self.stores:
            raise ProtocolError(f"buffer {dest.key} written while a TMA store not yet waited for reads it")

    def allocate(self, dtype: Any, shape: Any, layout: Any) -> Any:
        if layout is HopperModel.MBAR:
            return _Barriers(int(shape[0]))
        return _Smem(np.zeros([int(s) for s in shape], dtype), self)

    def check_end(self) -> None:
        if self.groups or self.stores:
            raise ProtocolError("MMA groups or TMA stores still in flight at the end of the program")


def descriptor(array: np.ndarray, block: list[int]) -> SimpleNamespace:
    """A TMA descriptor of a 2-D numpy array with ``block`` (zero padding past the edges, clipped stores)."""
    return SimpleNamespace(base=array, dtype=array.dtype, layout=None,
                           block_type=SimpleNamespace(shape=list(block), nbytes=int(np.prod(block)) * array.itemsize))
