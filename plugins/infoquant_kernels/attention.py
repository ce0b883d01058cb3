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
def _nibble(words, i: tl.constexpr, zero_magic, magic_bits):
    """``(code - z) * 2^e`` (float32, exact) of nibble ``i`` of each 32-bit word of codes (element ``8 * word + i``),
    ``e`` = 0, 4, 8, 12, 16, 8, 12, 16: the nibble is left where it sits in the word (``words`` is the word for
    i < 5, the word shifted right by 12 for i = 5, 6, 7, so that the nibble stays within the 23 mantissa bits) and
    one LOP3 ORs it into the float 2^23 (``w & (15 << e) |
    magic_bits`` with ``magic_bits`` = 0x4B000000 is 2^23 + code * 2^e), so the FADD of ``zero_magic`` =
    2^23 + z * 2^e leaves (code - z) * 2^e. ``magic_bits`` comes in a register (a kernel argument): with two
    immediates the mask and the OR compile to two LOP3s."""
    e: tl.constexpr = 4 * i if i < 5 else 4 * i - 12
    return ((words & (15 << e)) | magic_bits).to(tl.float32, bitcast=True) - zero_magic


@triton.jit
def _zero_magic(z, i: tl.constexpr):
    """2^23 + z * 2^e for nibble ``i`` (``_nibble``); exact in float32 (z <= 15, e <= 16)."""
    e: tl.constexpr = 4 * i if i < 5 else 4 * i - 12
    return z * (1 << e) + 8388608.0


@triton.jit
def _times(a0, a1, a2, a3, a4, a5, a6, a7, f):
    """The CUDA-core kernel's eight value-sum tiles, each times ``f``."""
    return a0 * f, a1 * f, a2 * f, a3 * f, a4 * f, a5 * f, a6 * f, a7 * f


@triton.jit
def kv4_decode_partial_cc_kernel(
    q_ptr, stride_qb, stride_qh,
    kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr,
    stride_cb, stride_ch, stride_ct, stride_sb, stride_sh,
    len_ptr, part_o_ptr, part_m_ptr, part_l_ptr,
    num_kv_heads, chunk, max_len, qk_scale, magic_bits,
    G: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, SPLITS: tl.constexpr, STAGES: tl.constexpr = 1,
    SLOTS: tl.constexpr = False,
):
    """``kv4_decode_partial_kernel`` on the CUDA cores, one query head per program (grid ``(B * Hq, splits)``; a GQA
    group's KV head is read by each of its G query heads): no padding of the query to 16 tensor-core rows (15 of
    16 rows wasted at G = 1), no shared-memory transposes of the dequantized tiles. Everything in float32.

    The codes are read as 32-bit words (``D / 8`` per token, 8 nibbles each; D % 8 == 0, code strides multiples of
    4 bytes), nibble ``i`` of word ``w`` being element ``8w + i``, so q is split into 8 vectors ``q_i[w] = q[8w + i]``
    and each nibble costs a shift, a LOP3, an FADD (``code - z``, exact) and an FFMA. Scores
    ``sum_i q_i . (nibble_i - z) * s_k``; the value sums stay 8 ``[BT, D/8]`` tiles reduced over tokens once at the
    end, rescaled by the online-softmax factor only when the running max grows (otherwise the factor is exactly
    1). Same partial outputs (and combine kernel) as the tensor-core kernel; float32 rounding only, where the
    tensor-core kernel rounds q and p * s_v to a 16-bit q's type.

    ``SLOTS``: the online softmax keeps a running max and sum per token slot r of the tile (the tokens r, r + BT,
    r + 2 BT, ... of the chunk), each slot's accumulator row rescaled by its own factor in every tile, and merges
    the slots once at the end (weights 2^(m_r - M)). No block-wide max / sum per tile (no barriers in the loop:
    sm_90 BT = 64: 0 against 6, 600 against 635 instructions per tile), at the cost of rescaling every tile (the
    block form skips the rescale when the max did not grow). Same partial outputs up to float32 rounding.

    ``STAGES`` > 1 software-pipelines the token loop: the next tiles' codes, scales and zero points are copied to
    shared memory asynchronously (cp.async) while this tile is computed. Triton pipelines a loop without a dot
    only when the loop itself asks for stages (``tl.range(num_stages=...)``), not from the launch's ``num_stages``.
    Same values either way."""
    W: tl.constexpr = D // 8
    bhq = tl.program_id(0)
    split = tl.program_id(1)
    hq_per_b = num_kv_heads * G
    b = bhq // hq_per_b
    h = (bhq % hq_per_b) // G
    length = tl.minimum(tl.load(len_ptr + b), max_len)
    t_start = split * chunk
    t_end = tl.minimum(t_start + chunk, length)

    w8 = 8 * tl.arange(0, W)
    q_row = q_ptr + b.to(tl.int64) * stride_qb + (bhq % hq_per_b) * stride_qh
    # q_i = q[8w + i] * 2^-e_i (exact): the nibble products then equal q[8w + i] * (code - z) exactly
    q0 = tl.load(q_row + w8).to(tl.float32) * qk_scale
    q1 = tl.load(q_row + w8 + 1).to(tl.float32) * qk_scale * 0.0625
    q2 = tl.load(q_row + w8 + 2).to(tl.float32) * qk_scale * 0.00390625
    q3 = tl.load(q_row + w8 + 3).to(tl.float32) * qk_scale * 0.000244140625
    q4 = tl.load(q_row + w8 + 4).to(tl.float32) * qk_scale * 1.52587890625e-05
    q5 = tl.load(q_row + w8 + 5).to(tl.float32) * qk_scale * 0.00390625
    q6 = tl.load(q_row + w8 + 6).to(tl.float32) * qk_scale * 0.000244140625
    q7 = tl.load(q_row + w8 + 7).to(tl.float32) * qk_scale * 1.52587890625e-05

    kw_ptr = kc_ptr.to(tl.pointer_type(tl.uint32))
    vw_ptr = vc_ptr.to(tl.pointer_type(tl.uint32))
    c_base = (b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch) // 4
    stride_tw = stride_ct // 4
    s_base = b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
    if SLOTS:  # a running max / sum per token slot r of the tile (tokens r, r + BT, ...): no cross-warp reduction
        m_i = tl.full((BT,), float("-inf"), tl.float32)
        l_i = tl.zeros((BT,), tl.float32)
    else:
        m_i = tl.max(tl.full((1,), float("-inf"), tl.float32), axis=0)
        l_i = tl.sum(tl.zeros((1,), tl.float32), axis=0)
    a0 = tl.zeros((BT, W), tl.float32)
    a1 = tl.zeros((BT, W), tl.float32)
    a2 = tl.zeros((BT, W), tl.float32)
    a3 = tl.zeros((BT, W), tl.float32)
    a4 = tl.zeros((BT, W), tl.float32)
    a5 = tl.zeros((BT, W), tl.float32)
    a6 = tl.zeros((BT, W), tl.float32)
    a7 = tl.zeros((BT, W), tl.float32)
    for t0 in tl.range(t_start, t_end, BT, num_stages=STAGES):
        t = t0 + tl.arange(0, BT)
        tmask = t < t_end
        w_ofs = c_base + t[:, None] * stride_tw + tl.arange(0, W)[None, :]
        kw = tl.load(kw_ptr + w_ofs, mask=tmask[:, None], other=0)
        kh = kw >> 12
        k_s = tl.load(ks_ptr + s_base + t, mask=tmask, other=0.0)
        kz = tl.load(kz_ptr + s_base + t, mask=tmask, other=0).to(tl.float32)[:, None]
        dots = _nibble(kw, 0, _zero_magic(kz, 0), magic_bits) * q0[None, :]
        dots += _nibble(kw, 1, _zero_magic(kz, 1), magic_bits) * q1[None, :]
        dots += _nibble(kw, 2, _zero_magic(kz, 2), magic_bits) * q2[None, :]
        dots += _nibble(kw, 3, _zero_magic(kz, 3), magic_bits) * q3[None, :]
        dots += _nibble(kw, 4, _zero_magic(kz, 4), magic_bits) * q4[None, :]
        dots += _nibble(kh, 5, _zero_magic(kz, 5), magic_bits) * q5[None, :]
        dots += _nibble(kh, 6, _zero_magic(kz, 6), magic_bits) * q6[None, :]
        dots += _nibble(kh, 7, _zero_magic(kz, 7), magic_bits) * q7[None, :]
        scores = tl.where(tmask, tl.sum(dots, axis=1) * k_s, float("-inf"))
        if SLOTS:
            m_new = tl.maximum(m_i, scores)
            m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)  # a slot without a token so far: alpha = p = 0
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(scores - m_ref)
            l_i = l_i * alpha + p
        else:
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=0)

        vw = tl.load(vw_ptr + w_ofs, mask=tmask[:, None], other=0)
        vh = vw >> 12
        v_s = tl.load(vs_ptr + s_base + t, mask=tmask, other=0.0)
        vz = tl.load(vz_ptr + s_base + t, mask=tmask, other=0).to(tl.float32)[:, None]
        pv = (p * v_s)[:, None]
        if SLOTS:  # every slot rescaled by its own factor (1 where its max did not grow)
            a0, a1, a2, a3, a4, a5, a6, a7 = _times(a0, a1, a2, a3, a4, a5, a6, a7, alpha[:, None])
        elif m_new > m_i:  # else alpha == 1 exactly: the rescale would change nothing
            a0, a1, a2, a3, a4, a5, a6, a7 = _times(a0, a1, a2, a3, a4, a5, a6, a7, alpha)
        a0 = a0 + pv * _nibble(vw, 0, _zero_magic(vz, 0), magic_bits)
        a1 = a1 + pv * _nibble(vw, 1, _zero_magic(vz, 1), magic_bits)
        a2 = a2 + pv * _nibble(vw, 2, _zero_magic(vz, 2), magic_bits)
        a3 = a3 + pv * _nibble(vw, 3, _zero_magic(vz, 3), magic_bits)
        a4 = a4 + pv * _nibble(vw, 4, _zero_magic(vz, 4), magic_bits)
        a5 = a5 + pv * _nibble(vh, 5, _zero_magic(vz, 5), magic_bits)
        a6 = a6 + pv * _nibble(vh, 6, _zero_magic(vz, 6), magic_bits)
        a7 = a7 + pv * _nibble(vh, 7, _zero_magic(vz, 7), magic_bits)
        m_i = m_new

    if SLOTS:  # merge the slots: weights 2^(m_r - M), 0 for slots that saw no token
        m_slots = m_i
        m_i = tl.max(m_slots, axis=0)
        w = tl.exp2(m_slots - tl.where(m_i > float("-inf"), m_i, 0.0))
        l_i = tl.sum(l_i * w, axis=0)
        a0, a1, a2, a3, a4, a5, a6, a7 = _times(a0, a1, a2, a3, a4, a5, a6, a7, w[:, None])
    ml_ofs = bhq.to(tl.int64) * SPLITS + split
    tl.store(part_m_ptr + ml_ofs, m_i)
    tl.store(part_l_ptr + ml_ofs, l_i)
    o_row = part_o_ptr + ml_ofs * D + w8  # the sums of nibble i carry the factor 2^e_i: undone exactly
    tl.store(o_row, tl.sum(a0, axis=0))
    tl.store(o_row + 1, tl.sum(a1, axis=0) * 0.0625)
    tl.store(o_row + 2, tl.sum(a2, axis=0) * 0.00390625)
    tl.store(o_row + 3, tl.sum(a3, axis=0) * 0.000244140625)
    tl.store(o_row + 4, tl.sum(a4, axis=0) * 1.52587890625e-05)
    tl.store(o_row + 5, tl.sum(a5, axis=0) * 0.00390625)
    tl.store(o_row + 6, tl.sum(a6, axis=0) * 0.000244140625)
    tl.store(o_row + 7, tl.sum(a7, axis=0) * 1.52587890625e-05)


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
