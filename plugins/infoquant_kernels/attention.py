"""Decode attention that reads the 4-bit KV cache directly (split-K / flash-decoding).

Cache layout (the ONNX ``KVQuantize`` contract): codes ``[B, Hkv, T, D/2]`` uint8 (element 2i in the low nibble),
scale ``[B, Hkv, T]`` float32, zero point ``[B, Hkv, T]`` uint8; ``x_hat = (code - z) * s``.

Stage 1 (``kv4_decode_partial_kernel``), grid ``(B * Hkv, splits)``: one program takes every query head of a GQA
group and one chunk of the context, dequantizes K and V tiles in registers and keeps an online softmax in float32
(scores in log2 units). The nibbles are never interleaved: the query is split into its even and odd elements, which
meet the low and high nibbles of K, and the value sums for even and odd output elements are kept apart.
Stage 2 (``kv4_decode_combine_kernel``), grid ``(B * Hq,)``: merges the chunks' (max, sum, accumulator).
Precision: float32 arithmetic (the fake-quant reference uses float64 here); errors are ~1e-6 relative.
"""

import triton
import triton.language as tl


@triton.jit
def kv4_decode_partial_kernel(
    q_ptr, stride_qb, stride_qh,                       # q [B, Hq, D]
    kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr,    # cache tensors (K and V share strides)
    stride_cb, stride_ch, stride_ct,                   # codes strides (bytes) over batch, KV head, token
    stride_sb, stride_sh,                              # scale / zero strides over batch, KV head (tokens contiguous)
    len_ptr,                                           # valid tokens per batch row [B] int32
    part_o_ptr, part_m_ptr, part_l_ptr,                # partials: o [B, Hq, S, D] f32, m / l [B, Hq, S] f32
    num_kv_heads, chunk, qk_scale,                     # qk_scale = head_dim^-0.5 * log2(e)
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, SPLITS: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    length = tl.load(len_ptr + b)
    t_start = split * chunk
    t_end = tl.minimum(t_start + chunk, length)

    g = tl.arange(0, GP)
    gmask = g < G
    half = tl.arange(0, D // 2)
    q_base = q_ptr + b.to(tl.int64) * stride_qb + (h * G + g)[:, None] * stride_qh
    q_even = tl.load(q_base + 2 * half[None, :], mask=gmask[:, None], other=0.0).to(tl.float32) * qk_scale
    q_odd = tl.load(q_base + 2 * half[None, :] + 1, mask=gmask[:, None], other=0.0).to(tl.float32) * qk_scale

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
        k_z = tl.load(kz_ptr + s_base + t, mask=tmask, other=0).to(tl.float32)
        k_lo = (k_codes & 15).to(tl.float32) - k_z[:, None]
        k_hi = (k_codes >> 4).to(tl.float32) - k_z[:, None]
        scores = tl.sum(q_even[:, None, :] * k_lo[None, :, :], axis=2) + tl.sum(q_odd[:, None, :] * k_hi[None, :, :],
                                                                                   axis=2)
        scores = tl.where(tmask[None, :], scores * k_s[None, :], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)

        v_codes = tl.load(vc_ptr + c_ofs, mask=tmask[:, None], other=0)
        v_s = tl.load(vs_ptr + s_base + t, mask=tmask, other=0.0)
        v_z = tl.load(vz_ptr + s_base + t, mask=tmask, other=0).to(tl.float32)
        v_lo = ((v_codes & 15).to(tl.float32) - v_z[:, None]) * v_s[:, None]
        v_hi = ((v_codes >> 4).to(tl.float32) - v_z[:, None]) * v_s[:, None]
        acc_even = acc_even * alpha[:, None] + tl.sum(p[:, :, None] * v_lo[None, :, :], axis=1)
        acc_odd = acc_odd * alpha[:, None] + tl.sum(p[:, :, None] * v_hi[None, :, :], axis=1)
        m_i = m_new

    hq = b * (num_kv_heads * G) + h * G + g                   # flat (batch, query head) index
    ml_ofs = hq.to(tl.int64) * SPLITS + split
    tl.store(part_m_ptr + ml_ofs, m_i, mask=gmask)
    tl.store(part_l_ptr + ml_ofs, l_i, mask=gmask)
    o_ofs = ml_ofs[:, None] * D + 2 * half[None, :]
    tl.store(part_o_ptr + o_ofs, acc_even, mask=gmask[:, None])
    tl.store(part_o_ptr + o_ofs + 1, acc_odd, mask=gmask[:, None])


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
