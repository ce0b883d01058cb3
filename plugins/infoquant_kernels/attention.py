"""Decode attention that reads the 4-bit KV cache directly (split-K / flash-decoding).

Cache layout (the ONNX ``KVQuantize`` contract): codes ``[B, Hkv, T, D/2]`` uint8 (element 2i in the low nibble),
scale ``[B, Hkv, T]`` float32, zero point ``[B, Hkv, T]`` uint8; ``x_hat = (code - z) * s``.

Stage 1 (``kv4_decode_partial_kernel``), grid ``(B * Hkv, splits)``: one program takes every query head of a GQA
group and one chunk of the context, dequantizes K and V tiles in registers and keeps an online softmax in float32
(scores in log2 units). The nibbles are never interleaved: the query is split into its even and odd elements, which
meet the low and high nibbles of K, and the value sums for even and odd output elements are kept apart.
Stage 2 (``kv4_decode_combine_kernel``), grid ``(B * Hq,)``: merges the chunks' (max, sum, accumulator).
Precision: float32 softmax and accumulation; dot products on tensor cores in float16 (float16 q) or float32 "ieee"
(float32 q). The fake-quant reference uses float64 here.
"""

import triton
import triton.language as tl


@triton.jit
def _magic_zero(zero, DOT: tl.constexpr):
    """``M + z`` in the dot dtype, where the float with bits ``MAGIC | c`` is ``M + c`` for a 4-bit code ``c``:
    float32 2^23 (0x4B000000), float16 1024 (0x6400), bfloat16 128 (0x4300); exact for z <= 15."""
    if DOT == 0:
        return zero.to(tl.float32) + 8388608.0
    elif DOT == 1:
        return zero.to(tl.float16) + 1024.0
    else:
        return zero.to(tl.bfloat16) + 128.0


@triton.jit
def _codes_minus_zero(codes, zero_magic, DOT: tl.constexpr):
    """``code - z`` (exact) in the dot dtype from 4-bit codes (uint8 in [0, 15]): the code's bits OR-ed into the
    magic constant's (no int -> float conversion; I2F runs at a quarter of the FP32 rate), minus ``M + z``."""
    if DOT == 0:
        return (codes.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - zero_magic
    elif DOT == 1:
        return (codes.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - zero_magic
    else:
        return (codes.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True) - zero_magic


@triton.jit
def kv4_decode_partial_kernel(
    q_ptr, stride_qb, stride_qh,                       # q [B, Hq, D]
    kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr,    # cache tensors (K and V share strides)
    stride_cb, stride_ch, stride_ct,                   # codes strides (bytes) over batch, KV head, token
    stride_sb, stride_sh,                              # scale / zero strides over batch, KV head (tokens contiguous)
    len_ptr,                                           # valid tokens per batch row [B] int32
    part_o_ptr, part_m_ptr, part_l_ptr,                # partials: o [B, Hq, S, D] f32, m / l [B, Hq, S] f32
    num_kv_heads, chunk, max_len, qk_scale,            # qk_scale = head_dim^-0.5 * log2(e)
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, SPLITS: tl.constexpr,
    DOT: tl.constexpr,                                 # dot operand dtype: 0 float32 ("ieee"), 1 float16, 2 bfloat16
):
    """Dot products on tensor cores: scores = q_even @ (k_lo - z)^T + q_odd @ (k_hi - z)^T, then * s_k per token;
    o_even += (p * s_v) @ (v_lo - z), o_odd likewise. ``code - z`` is an exact small integer in float16 / bfloat16, so
    with a 16-bit q only q and p * s_v are rounded to that type (as an FP16 attention would); a float32 q gets
    float32 "ieee" dots. Lengths are clamped to ``max_len``. ``GP >= 16`` query rows (padded) per program: the GQA
    group of one KV head."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    length = tl.minimum(tl.load(len_ptr + b), max_len)
    t_start = split * chunk
    t_end = tl.minimum(t_start + chunk, length)
    dt: tl.constexpr = tl.float32 if DOT == 0 else tl.float16 if DOT == 1 else tl.bfloat16
    prec: tl.constexpr = "ieee" if DOT == 0 else "tf32"

    g = tl.arange(0, GP)
    gmask = g < G
    half = tl.arange(0, D // 2)
    q_base = q_ptr + b.to(tl.int64) * stride_qb + (h * G + g)[:, None] * stride_qh
    q_even = (tl.load(q_base + 2 * half[None, :], mask=gmask[:, None], other=0.0).to(tl.float32) * qk_scale).to(dt)
    q_odd = (tl.load(q_base + 2 * half[None, :] + 1, mask=gmask[:, None], other=0.0).to(tl.float32)
             * qk_scale).to(dt)

    c_base = b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch
    s_base = b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc_even = tl.zeros((GP, D // 2), tl.float32)
    acc_odd = tl.zeros((GP, D // 2), tl.float32)
    for t0 in range(t_start, t_end, BT):
        t = t0 + tl.arange(0, BT)
        tmask = t < t_end
        c_ofs = c_base + t[:, None] * stride_ct + half[None, :]
        k_codes = tl.load(kc_ptr + c_ofs, mask=tmask[:, None], other=0)
        k_s = tl.load(ks_ptr + s_base + t, mask=tmask, other=0.0)
        k_z = _magic_zero(tl.load(kz_ptr + s_base + t, mask=tmask, other=0), DOT)[:, None]
        k_lo = _codes_minus_zero(k_codes & 15, k_z, DOT)
        k_hi = _codes_minus_zero(k_codes >> 4, k_z, DOT)
        scores = tl.dot(q_even, tl.trans(k_lo), input_precision=prec)
        scores = tl.dot(q_odd, tl.trans(k_hi), scores, input_precision=prec)
        scores = tl.where(tmask[None, :], scores * k_s[None, :], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)

        v_codes = tl.load(vc_ptr + c_ofs, mask=tmask[:, None], other=0)
        v_s = tl.load(vs_ptr + s_base + t, mask=tmask, other=0.0)
        v_z = _magic_zero(tl.load(vz_ptr + s_base + t, mask=tmask, other=0), DOT)[:, None]
        pv = (p * v_s[None, :]).to(dt)
        acc_even = tl.dot(pv, _codes_minus_zero(v_codes & 15, v_z, DOT), acc_even * alpha[:, None],
                          input_precision=prec)
        acc_odd = tl.dot(pv, _codes_minus_zero(v_codes >> 4, v_z, DOT), acc_odd * alpha[:, None],
                         input_precision=prec)
        m_i = m_new

    hq = b * (num_kv_heads * G) + h * G + g                   # flat (batch, query head) index
    ml_ofs = hq.to(tl.int64) * SPLITS + split
    tl.store(part_m_ptr + ml_ofs, m_i, mask=gmask)
    tl.store(part_l_ptr + ml_ofs, l_i, mask=gmask)
    o_ofs = ml_ofs[:, None] * D + 2 * half[None, :]
    tl.store(part_o_ptr + o_ofs, acc_even, mask=gmask[:, None])
    tl.store(part_o_ptr + o_ofs + 1, acc_odd, mask=gmask[:, None])


@triton.jit
def kv4_decode_partial_cc_kernel(
    q_ptr, stride_qb, stride_qh,
    kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr,
    stride_cb, stride_ch, stride_ct, stride_sb, stride_sh,
    len_ptr, part_o_ptr, part_m_ptr, part_l_ptr,
    num_kv_heads, chunk, max_len, qk_scale,
    G: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, SPLITS: tl.constexpr,
):
    """``kv4_decode_partial_kernel`` on the CUDA cores, one query head per program (grid ``(B * Hq, splits)``; a GQA
    group's KV head is read by each of its G query heads): no padding of the query to 16 tensor-core rows (15 of
    16 rows wasted at G = 1), no shared-memory transposes of the dequantized tiles. Everything in float32: scores
    ``(q_even . (k_lo - z) + q_odd . (k_hi - z)) * s_k``; the value sums stay a ``[BT, D/2]`` tile per parity
    (one FFMA per element per step, rescaled by the online-softmax factor) reduced over tokens once at the end.
    Same partial outputs (and combine kernel) as the tensor-core kernel; float32 rounding only, where the
    tensor-core kernel rounds q and p * s_v to a 16-bit q's type."""
    bhq = tl.program_id(0)
    split = tl.program_id(1)
    hq_per_b = num_kv_heads * G
    b = bhq // hq_per_b
    h = (bhq % hq_per_b) // G
    length = tl.minimum(tl.load(len_ptr + b), max_len)
    t_start = split * chunk
    t_end = tl.minimum(t_start + chunk, length)

    half = tl.arange(0, D // 2)
    q_row = q_ptr + b.to(tl.int64) * stride_qb + (bhq % hq_per_b) * stride_qh
    q_even = tl.load(q_row + 2 * half).to(tl.float32) * qk_scale
    q_odd = tl.load(q_row + 2 * half + 1).to(tl.float32) * qk_scale

    c_base = b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch
    s_base = b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
    m_i = tl.max(tl.full((1,), float("-inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros((1,), tl.float32), axis=0)
    acc_even = tl.zeros((BT, D // 2), tl.float32)
    acc_odd = tl.zeros((BT, D // 2), tl.float32)
    for t0 in range(t_start, t_end, BT):
        t = t0 + tl.arange(0, BT)
        tmask = t < t_end
        c_ofs = c_base + t[:, None] * stride_ct + half[None, :]
        k_codes = tl.load(kc_ptr + c_ofs, mask=tmask[:, None], other=0).to(tl.int32)
        k_s = tl.load(ks_ptr + s_base + t, mask=tmask, other=0.0)
        k_z = _magic_zero(tl.load(kz_ptr + s_base + t, mask=tmask, other=0), 0)[:, None]
        dots = (_codes_minus_zero(k_codes & 15, k_z, 0) * q_even[None, :]
                + _codes_minus_zero(k_codes >> 4, k_z, 0) * q_odd[None, :])
        scores = tl.where(tmask, tl.sum(dots, axis=1) * k_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)

        v_codes = tl.load(vc_ptr + c_ofs, mask=tmask[:, None], other=0).to(tl.int32)
        v_s = tl.load(vs_ptr + s_base + t, mask=tmask, other=0.0)
        v_z = _magic_zero(tl.load(vz_ptr + s_base + t, mask=tmask, other=0), 0)[:, None]
        pv = (p * v_s)[:, None]
        acc_even = acc_even * alpha + pv * _codes_minus_zero(v_codes & 15, v_z, 0)
        acc_odd = acc_odd * alpha + pv * _codes_minus_zero(v_codes >> 4, v_z, 0)
        m_i = m_new

    ml_ofs = bhq.to(tl.int64) * SPLITS + split
    tl.store(part_m_ptr + ml_ofs, m_i)
    tl.store(part_l_ptr + ml_ofs, l_i)
    o_ofs = ml_ofs * D + 2 * half
    tl.store(part_o_ptr + o_ofs, tl.sum(acc_even, axis=0))
    tl.store(part_o_ptr + o_ofs + 1, tl.sum(acc_odd, axis=0))


@triton.jit
def kv4_decode_combine_kernel(part_o_ptr, part_m_ptr, part_l_ptr, out_ptr, SPLITS: tl.constexpr,
                              SP: tl.constexpr, D: tl.constexpr):
    """out[bh] = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s over the splits (empty splits have m = -inf)."""
    bh = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SP)
    smask = s < SPLITS
    m = tl.load(part_m_ptr + bh * SPLITS + s, mask=smask, other=float("-inf"))
    l_s = tl.load(part_l_ptr + bh * SPLITS + s, mask=smask, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(smask & (m > float("-inf")), tl.exp2(m - m_max), 0.0)
    d = tl.arange(0, D)
    o = tl.load(part_o_ptr + (bh * SPLITS + s)[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w * l_s, axis=0)
    tl.store(out_ptr + bh * D + d, out.to(out_ptr.dtype.element_ty))
