"""KernelCausalLM (infoquant_export/kernels/model.py): the artifact's W4A4KV4 model through the kernels against the
fake-quant model it is built from."""

from __future__ import annotations

import collections
import functools

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from infoquant_export.artifact import load_artifact  # noqa: E402
from infoquant_export.errors import UserError  # noqa: E402
from infoquant_export.kernels.model import KernelCausalLM  # noqa: E402
from tests.helpers import sqnr_db  # noqa: E402
from tests.kernels.conftest import DEVICE, INTERPRETER_WARNING, requantize  # noqa: E402

pytestmark = pytest.mark.filterwarnings(INTERPRETER_WARNING)

BATCH, TOKENS = 2, 24
# Both thresholds are far above what one flipped activation code gives: a relative 5e-4 perturbation of the
# embeddings (float16 level) takes this model's fake-quant logits to 14 dB / 58 % top-1 (measured), so 100 dB
# means that every quantization code matched and only float32-vs-float64 rounding (attention) differs.
MIN_SQNR_DB = 100.0


@pytest.fixture(scope="module")
def prefill(tiny_artifact):
    """(ids, the fake-quant logits, the kernel model in float32, its prefill logits)."""
    ids = torch.randint(0, 512, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))
    reference, _ = load_artifact(tiny_artifact, "cpu", with_tokenizer=False).model(ids)
    kernel_model = KernelCausalLM(load_artifact(tiny_artifact, DEVICE, with_tokenizer=False).model, torch.float32,
                                  block=16)
    logits, cache = kernel_model(ids.to(DEVICE))
    assert cache.length == TOKENS
    return ids, reference, kernel_model, logits.cpu()


def test_prefill_matches_fake_quant(prefill):
    ids, reference, _, logits = prefill
    assert logits.shape == reference.shape == (BATCH, TOKENS, 512) and logits.dtype == torch.float32
    # measured 137.7 dB (134.8 dB with float32 norms before the float64 RMSNorm prologue), top-1 100 %
    assert sqnr_db(reference, logits) > MIN_SQNR_DB
    assert torch.equal(reference.argmax(-1), logits.argmax(-1))


def test_prefill_then_decode_equals_one_prefill(prefill):
    """Prefill 14 tokens (cache capacity 16 with block=16), then decode 6 tokens one at a time through the split-K
    4-bit attention kernel; the cache grows to 32 at the 17th token. Logits equal those of one prefill."""
    ids, _, kernel_model, logits = prefill
    ids = ids.to(DEVICE)
    first, cache = kernel_model(ids[:, :14])
    assert cache.capacity == 16
    steps = [first.cpu()]
    for i in range(14, 20):
        out, cache = kernel_model(ids[:, i : i + 1], cache)
        steps.append(out.cpu())
    assert cache.capacity == 32 and cache.length == 20
    decoded = torch.cat(steps, dim=1)
    # measured 136.1 dB, top-1 100 %
    assert sqnr_db(logits[:, :20], decoded) > MIN_SQNR_DB
    assert torch.equal(logits[:, :20].argmax(-1), decoded.argmax(-1))


def test_prefill_planes_same_logits(prefill, tiny_artifact):
    """``prefill_planes``: int8 weight planes and plane-quantized activations for M >= 17 rows (the plane GEMMs),
    the same bits as the packed operands; decode steps (M = 2) keep the packed codes."""
    ids, _, kernel_model, logits = prefill
    planar = KernelCausalLM(load_artifact(tiny_artifact, DEVICE, with_tokenizer=False).model, torch.float32,
                            block=16, prefill_planes=True)
    assert planar.layers[0].qkv.planes is not None
    got, cache = planar(ids.to(DEVICE))
    assert torch.equal(got.cpu(), logits)
    step, _ = planar(ids[:, :1].to(DEVICE), cache)
    expected, _ = kernel_model(ids[:, :1].to(DEVICE), kernel_model(ids.to(DEVICE))[1])
    assert torch.equal(step.cpu(), expected.cpu())


def test_decode_step_reads_position_from_device(prefill):
    """``decode_step``, the CUDA-graph form of a decode step (position and attention lengths read by the kernels
    from device memory, the decode kernel's split sized for the capacity): after a 14-token prefill, the steps at
    positions 14 and 15 give the one-prefill logits and write the same cache bits as ``forward``'s steps."""
    ids, _, kernel_model, logits = prefill
    ids = ids.to(DEVICE)
    _, eager = kernel_model(ids[:, :14])
    _, graphable = kernel_model(ids[:, :14])
    steps = []
    for i in (14, 15):
        pos = torch.tensor([i], dtype=torch.int32, device=DEVICE)
        steps.append(kernel_model.decode_step(ids[:, i : i + 1], pos, graphable).cpu())
        kernel_model(ids[:, i : i + 1], eager)
    assert graphable.length == 14 and graphable.graph is None  # host bookkeeping is the caller's (and no graph on CPU)
    decoded = torch.cat(steps, dim=1)
    # measured 135.0 dB, top-1 100 %
    assert sqnr_db(logits[:, 14:16], decoded) > MIN_SQNR_DB
    assert torch.equal(logits[:, 14:16].argmax(-1), decoded.argmax(-1))
    for pair_e, pair_g in zip(eager.layers, graphable.layers, strict=True):
        for e, g in zip(pair_e, pair_g, strict=True):
            for name in ("codes", "scale", "zero"):
                assert torch.equal(getattr(e, name).cpu(), getattr(g, name).cpu()), name


def launch_trace(fn, cache) -> tuple[list, collections.Counter]:
    """(Triton launches, host reads) of ``fn()``: each launch as (kernel, grid, arguments), a tensor argument as
    (dtype, shape, strides, whether it is one of ``cache``'s tensors); host reads: the torch ops outside the
    launches that bring a tensor's value to the host (``_local_scalar_dense``: ``.item()``, ``int(t)``, ...)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.interpreter import InterpretedFunction

    cache_ptrs = {t.data_ptr() for pair in cache.layers for c in pair for t in (c.codes, c.scale, c.zero)}
    launches, inside, reads = [], [False], collections.Counter()

    def describe(value):
        if isinstance(value, torch.Tensor):
            return (value.dtype, tuple(value.shape), value.stride(), value.data_ptr() in cache_ptrs)
        return value

    class HostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "_local_scalar_dense" and not inside[0]:
                reads[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    run = InterpretedFunction.run

    def traced(self, *args, grid, warmup, **kwargs):
        launches.append((self.__name__, tuple(grid), tuple(describe(a) for a in args),
                         tuple(sorted((k, describe(v)) for k, v in kwargs.items()))))
        inside[0] = True
        try:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            inside[0] = False

    InterpretedFunction.run = traced
    try:
        with HostReads():
            fn()
    finally:
        InterpretedFunction.run = run
    return launches, reads


@pytest.mark.skipif(DEVICE != "cpu", reason="traces the interpreter's launches")
def test_decode_step_is_graph_replayable(prefill):
    """What a CUDA graph of ``decode_step`` needs, checked in the interpreter: at positions 9 and 10 of one cache it
    launches the same kernels with the same grids, scalars and tensor layouts, writing the same cache tensors (the
    position reaches the kernels only through device memory), and reads no value back to the host."""
    ids, _, kernel_model, _ = prefill
    _, cache = kernel_model(ids[:, :9])
    traces = []
    for i in (9, 10):
        pos = torch.tensor([i], dtype=torch.int32)
        step = functools.partial(kernel_model.decode_step, ids[:, i : i + 1], pos, cache)
        traces.append(launch_trace(step, cache))
    (first, reads_first), (second, reads_second) = traces
    n_layers = len(kernel_model.layers)
    assert len(first) == 13 * n_layers, len(first)  # measured 13 per layer (as forward's decode layer)
    assert first == second
    assert not reads_first and not reads_second, (reads_first, reads_second)  # measured: none


@pytest.mark.parametrize("quant,message", [
    ({"a_bits": 8}, "not a 4-bit quantizer"),
    ({"kv_bits": 16}, "k_cache is not 4-bit"),
    ({"w_bits": 8}, "weights are not 4-bit"),
])
def test_not_w4a4_artifact_raises(tiny_artifact, quant, message):
    name = "-".join(f"{k}{v}" for k, v in quant.items())
    model = load_artifact(requantize(tiny_artifact, name, **quant), DEVICE, with_tokenizer=False).model
    with pytest.raises(UserError, match=message):
        KernelCausalLM(model, torch.float32)


def count_decode_layer_ops(kernel_model: KernelCausalLM, cache, pos: int,
                           index: int) -> tuple[int, collections.Counter]:
    """(Triton launches, PyTorch compute ops) of one decode layer: every op between the kernels is a launch on a
    GPU. Views and allocations are not counted, nor the interpreter's own tensor copies inside a launch."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.interpreter import InterpretedFunction

    free = {"view", "_unsafe_view", "reshape", "split", "split_with_sizes", "unflatten", "as_strided", "slice",
            "select", "unsqueeze", "squeeze", "expand", "t", "transpose", "permute", "detach", "alias", "empty",
            "empty_like", "empty_strided", "lift_fresh"}
    launches, inside, torch_ops = [0], [False], collections.Counter()

    class TorchOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in free and not inside[0]:
                torch_ops[name] += 1
            return func(*args, **(kwargs or {}))

    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        launches[0] += 1
        inside[0] = True
        try:
            return run(self, *args, **kwargs)
        finally:
            inside[0] = False

    x = torch.randn(BATCH, 1, kernel_model.cfg.hidden_size, dtype=kernel_model.dtype)
    rope = kernel_model.rope(pos, 1)
    InterpretedFunction.run = counted
    try:
        with TorchOps():
            kernel_model.layer_forward(index, x, cache, pos, rope)
    finally:
        InterpretedFunction.run = run
    return launches[0], torch_ops


@pytest.mark.skipif(DEVICE != "cpu", reason="counts the interpreter's launches")
def test_decode_layer_is_kernels_only(prefill):
    """The norms, RoPE and SwiGLU run as prologues of the quantize kernels: a decode layer is 13 Triton launches
    (7 row kernels, 4 GEMMs, 2 attention) and no torch op (the first layer of a step makes the lengths tensor all
    layers share); it was 13 launches + 33 torch ops."""
    ids, _, kernel_model, _ = prefill
    _, cache = kernel_model(ids[:, :8])
    launches, torch_ops = count_decode_layer_ops(kernel_model, cache, 8, 0)
    assert launches == 13, launches  # measured 13
    assert dict(torch_ops) == {"full": 1}, torch_ops  # measured: the lengths tensor only
    launches, torch_ops = count_decode_layer_ops(kernel_model, cache, 8, 1)
    assert launches == 13 and not torch_ops, (launches, torch_ops)  # measured 13 and none (33 before)


@pytest.mark.skipif(DEVICE != "cpu", reason="counts the interpreter's launches")
def test_decode_layer_large_k_hadamard_is_kernels_only():
    """A down_proj Hadamard whose K does not fit the row kernel (intermediate 2752 = 172 x 16, the Williamson block
    of LLaMA-2-7B's 11008 = 172 x 64) runs as the chunked FWHT, the float64 K-step GEMM and the quantize kernel: 15
    launches and no torch op in a decode layer (before: 14 launches and a float64 torch ``bmm``); logits as the
    fake-quant model's."""
    from infoquant_export.kernels import ops
    from infoquant_export.kernels.random_model import random_w4a4kv4_model

    dims = dict(vocab_size=64, hidden_size=64, intermediate_size=2752, num_heads=2, num_kv_heads=2, head_dim=32)
    assert not ops.row_tile(2752, 1, True).fused and ops.row_tile(2752, 1, True).k == 172
    model = random_w4a4kv4_model(dims, 1, "cpu")
    ids = torch.randint(0, 64, (BATCH, 6), generator=torch.Generator().manual_seed(1))
    reference, _ = model(ids)
    kernel_model = KernelCausalLM(model, torch.float32, block=16)
    logits, cache = kernel_model(ids)
    assert sqnr_db(reference, logits) > MIN_SQNR_DB  # measured 138.9 dB
    launches, torch_ops = count_decode_layer_ops(kernel_model, cache, 6, 0)
    assert launches == 15 and dict(torch_ops) == {"full": 1}, (launches, torch_ops)  # measured 15, lengths only
