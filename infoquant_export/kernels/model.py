"""A W4A4KV4 decoder that runs the kernels: packed 4-bit weights, 4-bit activations and a 4-bit KV cache in memory.

:class:`KernelCausalLM` is built from the fake-quant :class:`CausalLM` of an artifact (``load_artifact``) and has
its interface (``forward(input_ids, past) -> (logits, cache)``, ``device``, ``cfg``), so perplexity and greedy
generation run on it unchanged. Per layer (numerics.md section 5) only kernels, 13 launches in a decode step
(the RMSNorm, SwiGLU and RoPE prologues are computed by the kernel that loads their input):

    RMSNorm + quantize (kernel) -> QKV GEMM (kernel, q/k/v fused)
      -> q: RoPE + Hadamard (kernel); K: RoPE + Hadamard + quantize into the 4-bit cache (kernel);
         V: quantize into the cache (kernel); all three read the QKV output in place
      -> attention: decode = 4-bit split-K kernel; prefill = dequantize kernel + SDPA
      -> quantize -> o GEMM + residual (kernel) -> RMSNorm + quantize (kernel) -> gate/up GEMM (kernel)
      -> SwiGLU + down Hadamard + quantize (one kernel) -> down GEMM + residual (kernel)

The LM head, the final norm and PSOT's residual basis changes run in PyTorch. Differences from the fake-quant
reference: the activation dtype (float16 by default, float32 on request; the norms, SwiGLU and RoPE outputs are
rounded to it) and attention in float32 instead of float64; norms and sigmoid are float64 as in the reference;
quantization, GEMMs and the cache are the reference's integer arithmetic.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from infoquant_export.errors import UserError
from infoquant_export.kernels.ops import (
    SWIGLU,
    W_PLANES_MIN_M,
    KVCache4,
    PackedWeight,
    Prologue,
    dequantize_kv,
    kv4_decode_attention,
    quantize_kv,
    quantize_rows,
    rmsnorm_prologue,
    rope_rows,
    w4a4_linear,
)
from infoquant_export.models.model import ActQuantizer, CausalLM, DecoderLayer, OnlineRotation, rms_norm
from infoquant_export.numerics import DEFAULT


def _require_w4a4(layer_index: int, name: str, quantizer: ActQuantizer) -> tuple[float, float]:
    if not quantizer.active or quantizer.bits != 4:
        raise UserError(f"layer {layer_index} {name} is not a 4-bit quantizer (bits={quantizer.bits}); the kernels "
                        "run W4A4KV4 only", "use the fake-quant model (--kernels off) for other bit widths")
    return quantizer.clips()


@dataclass
class Quant:
    """One activation quantizer: clips and the online Hadamard (number of blocks) applied before it, if any."""

    clip: float
    clip_min: float
    hadamard_blocks: int | None = None


def _hadamard_blocks(rotation: OnlineRotation | None, what: str, i: int) -> int | None:
    if rotation is None:
        return None
    if rotation.matrix is not None:
        raise UserError(f"layer {i}: the kernels apply Hadamard {what} rotations, this one is a learned matrix",
                        "use the fake-quant model (--kernels off)")
    return rotation.num_blocks


class KernelLayer:
    """One decoder layer's packed weights, quantizer settings and online ops."""

    def __init__(self, layer: DecoderLayer, index: int, device: torch.device, planes: bool = False) -> None:
        if layer.numerics.name != DEFAULT:
            raise UserError(f"the kernels implement the {DEFAULT} numerics, this artifact uses {layer.numerics.name}",
                            "use the fake-quant model (--kernels off)")
        for role in ("q", "k", "v", "o", "gate", "up", "down"):
            if not hasattr(layer, f"codes_{role}"):
                raise UserError(f"layer {index} {role}_proj has no 4-bit integer weight", "quantize with --w-bits 4")

        def packed(*roles: str) -> PackedWeight:
            codes = torch.cat([getattr(layer, f"codes_{r}") for r in roles])
            if codes.abs().max() > 8:
                raise UserError(f"layer {index} {'/'.join(roles)} weights are not 4-bit", "quantize with --w-bits 4")
            scale = torch.cat([getattr(layer, f"wscale_{r}") for r in roles])
            biases = [layer.linear(r).bias for r in roles]
            bias = torch.cat(biases) if all(b is not None for b in biases) else None
            weight = PackedWeight.from_codes(codes, scale, bias).to(device)
            return weight.with_planes() if planes else weight

        self.qkv, self.o, self.gate_up, self.down = packed("q", "k", "v"), packed("o"), packed("gate", "up"), \
            packed("down")
        self.qkv_in = Quant(*_require_w4a4(index, "qkv input", layer.qkv_in))
        self.o_in = Quant(*_require_w4a4(index, "o_proj input", layer.o_in))
        self.gate_up_in = Quant(*_require_w4a4(index, "gate/up input", layer.gate_up_in))
        self.down_in = Quant(*_require_w4a4(index, "down_proj input", layer.down_in),
                             _hadamard_blocks(layer.down_rotation, "down_proj input", index))
        for name in ("k_cache", "v_cache"):
            q = getattr(layer, name)
            if not q.active or q.bits != 4:
                raise UserError(f"layer {index} {name} is not 4-bit", "quantize with --kv-bits 4")
        self.k_clip, self.v_clip = layer.k_cache.clip, layer.v_cache.clip
        self.qk_blocks = _hadamard_blocks(layer.qk_rotation, "q/k", index)
        if self.qk_blocks not in (None, 1):
            raise UserError(f"layer {index}: the KV kernel rotates K with one Hadamard per head, the schema splits "
                            f"heads into {self.qk_blocks} blocks", "use the fake-quant model (--kernels off)")
        self.attn_to_mlp = layer.residual_attn_to_mlp
        self.mlp_to_attn = layer.residual_mlp_to_attn
        eps = layer.cfg.rms_norm_eps
        self.input_norm = rmsnorm_prologue(layer.input_norm.to(device), eps)
        self.post_norm = rmsnorm_prologue(layer.post_norm.to(device), eps)


@dataclass
class DecodeGraph:
    """A decode step captured as a CUDA graph: its static inputs (token ids, position) and output (logits), for one
    model, batch size and set of cache tensors (``key``)."""

    key: tuple
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # [B, 1] int64
    pos: torch.Tensor     # [1] int32
    logits: torch.Tensor  # [B, 1, vocab] float32


@dataclass
class KernelCache:
    """Per layer 4-bit K and V caches of one capacity, and how many positions are filled."""

    layers: list[tuple[KVCache4, KVCache4]]
    length: int = 0
    decode_lengths: tuple[int, torch.Tensor] | None = None  # (length, [B] int32): one tensor for all layers
    graph: DecodeGraph | None = None  # the decode step replayed on these cache tensors (CUDA)

    @property
    def capacity(self) -> int:
        return self.layers[0][0].capacity

    def lengths(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """The decode kernel's per-sequence lengths ``[batch]`` (all ``length``), made once per step."""
        if self.decode_lengths is None or self.decode_lengths[0] != length \
                or self.decode_lengths[1].shape[0] != batch:
            self.decode_lengths = (length, torch.full((batch,), length, dtype=torch.int32, device=device))
        return self.decode_lengths[1]


class KernelCausalLM:
    """The artifact's W4A4KV4 model on a GPU through the kernels (see the module docstring)."""

    def __init__(self, model: CausalLM, dtype: torch.dtype = torch.float16, block: int = 256,
                 decode_attention: str | None = None, cuda_graphs: bool | None = None,
                 prefill_planes: bool = False) -> None:
        self.model, self.cfg, self.dtype, self.block = model, model.cfg, dtype, block
        # prefill_planes: keep an int8 copy of every weight (2x the packed bytes) and quantize activations of
        # W_PLANES_MIN_M rows or more to int8 planes, so prefill GEMMs run on plane operands (the plane tiles and,
        # on a GPU, the library int8 GEMM among the autotune candidates); same bits. Opt-in: not timed yet.
        self.prefill_planes = prefill_planes
        # "tc" / "cc" / "ccs" / "mma" (kv4_decode_attention's kernel); None: the default
        self.decode_attention = decode_attention
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("INFOQUANT_CUDA_GRAPHS", "1") != "0"
        self.cuda_graphs = cuda_graphs  # decode steps on a CUDA device as graph replays (see decode_step)
        dev = model.device
        self.layers = [KernelLayer(layer, i, dev, prefill_planes) for i, layer in enumerate(model.layers)]
        self.lm_head = model.lm_head.weight.to(dtype)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def new_cache(self, batch: int, capacity: int) -> KernelCache:
        cfg = self.cfg
        cap = -(-capacity // self.block) * self.block
        return KernelCache([(KVCache4.empty(batch, cfg.num_kv_heads, cap, cfg.head_dim, self.device),
                             KVCache4.empty(batch, cfg.num_kv_heads, cap, cfg.head_dim, self.device))
                            for _ in self.layers])

    def _grow(self, cache: KernelCache, needed: int) -> None:
        if needed <= cache.capacity:
            return
        bigger = self.new_cache(cache.layers[0][0].codes.shape[0], max(needed, 2 * cache.capacity))
        for (k_old, v_old), (k_new, v_new) in zip(cache.layers, bigger.layers, strict=True):
            for old, new in ((k_old, k_new), (v_old, v_new)):
                n = cache.length
                new.codes[:, :, :n].copy_(old.codes[:, :, :n])
                new.scale[:, :, :n].copy_(old.scale[:, :, :n])
                new.zero[:, :, :n].copy_(old.zero[:, :, :n])
        cache.layers = bigger.layers

    def _linear(self, x: torch.Tensor, quant: Quant, weight: PackedWeight, residual: torch.Tensor | None = None,
                prologue: Prologue | None = None) -> torch.Tensor:
        planes = self.prefill_planes and x.shape[0] >= W_PLANES_MIN_M
        act = quantize_rows(x, 4, quant.clip, quant.clip_min, quant.hadamard_blocks, prologue=prologue, planes=planes)
        return w4a4_linear(act, weight, residual, out_dtype=self.dtype)

    def _attention(self, q: torch.Tensor, cache: KernelCache, index: int, start: int, length: int,
                   lengths: torch.Tensor | None = None) -> torch.Tensor:
        """q [B, S, Hq, D] (rotated) over layer ``index``'s cache positions [0, length); query i sits at position
        start + i. ``lengths``: a decode step's ``[B]`` int32 lengths on the device (``decode_step``), read by the
        kernel up to the cache capacity (``start`` / ``length`` unused)."""
        cfg = self.cfg
        b, s = q.shape[:2]
        k_cache, v_cache = cache.layers[index]
        if lengths is not None:
            return kv4_decode_attention(q[:, 0].contiguous(), k_cache, v_cache, lengths, k_cache.capacity,
                                        check_lengths=False, kernel=self.decode_attention)[:, None]
        if s == 1 and not cfg.sliding_window:
            lengths = cache.lengths(b, length, q.device)
            return kv4_decode_attention(q[:, 0].contiguous(), k_cache, v_cache, lengths, length,
                                        check_lengths=False, kernel=self.decode_attention)[:, None]
        k = dequantize_kv(k_cache, length, q.dtype)
        v = dequantize_kv(v_cache, length, q.dtype)
        gqa = cfg.num_heads != cfg.num_kv_heads
        if start == 0 and not cfg.sliding_window:  # a prompt from an empty cache: the causal (flash) kernels
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True, enable_gqa=gqa)
            return out.transpose(1, 2)
        q_pos = torch.arange(start, start + s, device=q.device)[:, None]
        k_pos = torch.arange(length, device=q.device)[None, :]
        allowed = k_pos <= q_pos
        if cfg.sliding_window:
            allowed &= k_pos > q_pos - cfg.sliding_window
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=allowed, enable_gqa=gqa)
        return out.transpose(1, 2)

    def rope(self, start: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos / sin tables ``[s, head_dim]`` of positions ``start ..`` (the model's, float64-rounded)."""
        cos, sin = self.model.rope(torch.arange(start, start + s, device=self.device), torch.float32)
        return cos.contiguous(), sin.contiguous()

    @torch.no_grad()
    def layer_forward(self, index: int, x: torch.Tensor, cache: KernelCache, start: int | torch.Tensor,
                      rope: tuple[torch.Tensor, torch.Tensor], lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder layer ``index`` on hidden states ``x [B, S, hidden]`` at positions ``start ..``; writes its K/V
        into ``cache`` (which must have room). ``start`` an int32 ``[1]`` device tensor: a decode step whose position
        the kernels read (``decode_step``; ``lengths`` = its ``[B]`` attention lengths)."""
        cfg, layer, layer_cache = self.cfg, self.layers[index], cache.layers[index]
        b, s = x.shape[:2]
        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        x2 = x.reshape(b * s, -1).to(self.dtype)
        qkv = self._linear(x2, layer.qkv_in, layer.qkv, prologue=layer.input_norm).view(b, s, -1)
        q, k, v = (t.unflatten(-1, (-1, d)) for t in qkv.split((hq * d, hkv * d, hkv * d), dim=-1))
        q = rope_rows(q, *rope, rotate=layer.qk_blocks is not None)
        quantize_kv(k, layer_cache[0], start, layer.k_clip, layer.qk_blocks is not None, rope=rope)
        quantize_kv(v, layer_cache[1], start, layer.v_clip, False)
        end = start + s if lengths is None else 0
        attn = self._attention(q, cache, index, start, end, lengths).reshape(b * s, hq * d).contiguous()
        resid = x2 if layer.attn_to_mlp is None else layer.attn_to_mlp(x2.float()).to(self.dtype)
        x2 = self._linear(attn, layer.o_in, layer.o, resid.contiguous())
        gate_up = self._linear(x2, layer.gate_up_in, layer.gate_up, prologue=layer.post_norm)
        resid = x2 if layer.mlp_to_attn is None else layer.mlp_to_attn(x2.float()).to(self.dtype)
        return self._linear(gate_up, layer.down_in, layer.down, resid.contiguous(), prologue=SWIGLU).reshape(b, s, -1)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return (rms_norm(x, self.model.norm, self.cfg.rms_norm_eps) @ self.lm_head.T).float()

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, past: KernelCache | None = None) -> tuple[torch.Tensor, KernelCache]:
        """Logits ``[B, S, vocab]`` (float32) of ``input_ids`` after the ``past`` cache's tokens, and the cache with
        them appended. A one-token step on a CUDA device replays the cache's decode graph (``cuda_graphs``)."""
        model = self.model
        b, s = input_ids.shape
        cache = past if past is not None else self.new_cache(b, s)
        start = cache.length
        self._grow(cache, start + s)
        if s == 1 and start > 0 and self.cuda_graphs and self.device.type == "cuda" and not self.cfg.sliding_window:
            return self._graphed_step(input_ids, cache), cache
        x = model.embed(input_ids).to(self.dtype)
        rope = self.rope(start, s)
        for index in range(len(self.layers)):
            x = self.layer_forward(index, x, cache, start, rope)
        cache.length = start + s
        return self._head(x), cache

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, pos: torch.Tensor, cache: KernelCache) -> torch.Tensor:
        """Logits ``[B, 1, vocab]`` of one new token per sequence at the position held by ``pos`` (int32 ``[1]`` on
        the device), written into ``cache`` (which must have room; ``cache.length`` is not changed). No host sync
        and nothing that depends on the position's value on the host: the kernels read ``pos`` and the attention
        lengths ``pos + 1`` from device memory (the decode kernel up to the cache capacity), so a CUDA graph of this
        call replays at any position. Same numbers as ``forward`` but for the decode kernel's split of the context
        (sized for the capacity here), i.e. float32 summation order."""
        if self.cfg.sliding_window:
            raise UserError("decode_step reads the whole cache; this model has a sliding window",
                            "use forward() for sliding-window models")
        b = tokens.shape[0]
        x = self.model.embed(tokens).to(self.dtype)
        cos, sin = self.model.rope(pos, torch.float32)
        rope = (cos.contiguous(), sin.contiguous())
        lengths = (pos + 1).expand(b).contiguous()
        for index in range(len(self.layers)):
            x = self.layer_forward(index, x, cache, pos, rope, lengths)
        return self._head(x)

    def _graphed_step(self, tokens: torch.Tensor, cache: KernelCache) -> torch.Tensor:
        """``decode_step`` at position ``cache.length`` as a replay of the cache's CUDA graph, captured on first use
        for this batch size and these cache tensors (again after the cache grows). The first call runs the step
        eagerly (it also autotunes the GEMMs) and then captures it. Returns the logits (a copy)."""
        key = (id(self), tokens.shape[0], cache.capacity, cache.layers[0][0].codes.data_ptr())  # model, batch, cache
        g = cache.graph
        if g is None or g.key != key:
            cache.graph = None  # free the old graph's memory pool before capturing a new one
            static_tokens = tokens.clone()
            pos = torch.tensor([cache.length], dtype=torch.int32, device=tokens.device)
            side = torch.cuda.Stream(tokens.device)
            side.wait_stream(torch.cuda.current_stream(tokens.device))
            with torch.cuda.stream(side):  # the warm-up: the real step at this position
                logits = self.decode_step(static_tokens, pos, cache)
            torch.cuda.current_stream(tokens.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                # the outer stream context restores the current stream even when the capture fails:
                # torch.cuda.graph's __exit__ skips that when capture_end raises
                with torch.cuda.stream(torch.cuda.current_stream(tokens.device)), torch.cuda.graph(graph):
                    out = self.decode_step(static_tokens, pos, cache)
            except Exception as err:  # e.g. an op that cannot be captured: keep decoding, eagerly
                warnings.warn(f"CUDA graph capture of the decode step failed ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200] if str(err) else ''}); decoding without graphs "
                              "(--cuda-graphs off)", RuntimeWarning, stacklevel=2)
                self.cuda_graphs = False
            else:
                cache.graph = DecodeGraph(key, graph, static_tokens, pos, out)
        else:
            g.tokens.copy_(tokens)
            g.pos.fill_(cache.length)
            g.graph.replay()
            logits = g.logits.clone()
        cache.length += 1
        return logits

    __call__ = forward
