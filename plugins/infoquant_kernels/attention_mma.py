"""4-bit KV decode attention on the tensor cores with the dequantized cache in the MMA operands' own registers
(Gluon, ``mma.sync`` m16n8k16; sm_80 - sm_90; compiled GPUs only).

Same split-K partials as ``attention.kv4_decode_partial_kernel`` (and its combine kernel) for a float16 q and a GQA
group of at most 8 query heads. Each warp is a slice of its own (the leading axis of every tensor, one warp each):
it takes BTW tokens per step and keeps its own online softmax; the warps merge once, after the loop.

- Scores ``[16, BTW] = q' [16, D] @ K'^T [D, BTW]`` (query rows padded to 16), values
  ``o^T [D, 8] = V'^T [D, BTW] @ P^T [BTW, 8]`` (rows 0..7 of the probabilities; G <= 8 heads). A sum over the
  head dimension does not depend on the order of its terms' indices, so the MMAs' k (scores) and m (values) indices
  run over the head dimension in a permuted order, ``k_dim`` / ``v_dim``: the order in which a thread's loaded code
  words unpack into exactly the values its MMA fragments hold. q is loaded in the scores' order, the partial output
  stored in the values' order, and no dequantized value moves between threads.
- One warp's probabilities leave the scores' MMA as its accumulator fragment and enter the values' MMA as its B
  fragment: the same registers (the three operand conversions assert they are trivial, so a layout change that
  would need shared memory or shuffles fails to compile; only the 8 softmax factors per warp move between lanes).
- Dequantization by the ``0x6400`` trick, two codes per instruction: ``(word & 0x000F000F) | 0x64006400`` is the
  float16 pair ``(1024 + c0, 1024 + c4)``; one ``sub.f16x2`` of ``1024 + z`` (the zero point's bits OR-ed into
  0x6400) leaves ``c - z`` (exact), and the codes at bits 4 - 7 / 20 - 23 take one ``fma.f16x2``
  (``* 1/16 - (64 + z)``, exact). 8 codes cost 4 LOP3, a shift and 4 half2 ops; the values' pairs are two tokens'
  codes, so two words are first interleaved by two PRMTs.
- The token loop runs over whole steps without masks (its loads vectorize); a last, partial step is masked.
  ``PREFETCH`` (2 stages) loads the next step's words, scales and zero points into registers while this step
  computes, with its token indices clamped to the chunk's last token instead of masked (the extra tokens of the
  last step score -inf there).

Precision: as the tensor-core kernel for a float16 q (q * scale and p * s_v rounded to float16, ``c - z`` exact,
float32 accumulation, float32 online softmax in log2 units).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

# (1024 + c0, 1024 + c4), (1024 + 16 c1, 1024 + 16 c5) from one word (and from the word >> 8 for c2 c6, c3 c7),
# then c - z: element j of the 8 outputs is the word's nibble PI[j] = (0, 4, 1, 5, 2, 6, 3, 7)[j]
_K_ASM = gl.constexpr("""{
.reg .b32 w8, s16;
mov.b32 s16, 0x2C002C00;
lop3.b32 $0, $4, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $1, $4, 0x00F000F0, 0x64006400, 0xEA;
shr.u32 w8, $4, 8;
lop3.b32 $2, w8, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $3, w8, 0x00F000F0, 0x64006400, 0xEA;
sub.rn.f16x2 $0, $0, $12;
fma.rn.f16x2 $1, $1, s16, $16;
sub.rn.f16x2 $2, $2, $12;
fma.rn.f16x2 $3, $3, s16, $16;
}""")
# 4 outputs; 8 words (one word 8 times); 4 half2 of 1024 + z, 4 of -(64 + z)
_K_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 4 + ["r"] * 16))

# two tokens' words A ($8), B ($9) interleaved (bytes A0 A1 B0 B1 / A2 A3 B2 B3), then as _K_ASM: output j is the
# pair (A's nibble PI[j] - zA, B's nibble PI[j] - zB)
_V_ASM = gl.constexpr("""{
.reg .b32 x, y, x8, y8, s16;
mov.b32 s16, 0x2C002C00;
prmt.b32 x, $8, $9, 0x5410;
prmt.b32 y, $8, $9, 0x7632;
shr.u32 x8, x, 8;
shr.u32 y8, y, 8;
lop3.b32 $0, x, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $1, y, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $2, x, 0x00F000F0, 0x64006400, 0xEA;
lop3.b32 $3, y, 0x00F000F0, 0x64006400, 0xEA;
lop3.b32 $4, x8, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $5, y8, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $6, x8, 0x00F000F0, 0x64006400, 0xEA;
lop3.b32 $7, y8, 0x00F000F0, 0x64006400, 0xEA;
sub.rn.f16x2 $0, $0, $24;
sub.rn.f16x2 $1, $1, $24;
fma.rn.f16x2 $2, $2, s16, $32;
fma.rn.f16x2 $3, $3, s16, $32;
sub.rn.f16x2 $4, $4, $24;
sub.rn.f16x2 $5, $5, $24;
fma.rn.f16x2 $6, $6, s16, $32;
fma.rn.f16x2 $7, $7, s16, $32;
}""")
# 8 outputs; 16 words (A, B, A, B, ...); 8 half2 of (1024 + zA, 1024 + zB), 8 of (-(64 + zA), -(64 + zB))
_V_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 8 + ["r"] * 32))


# the unpacked [NW, BTW, D/8 words, 8] K codes split as [NW, BTW, t, wl, j2, j1, j0] (word D/32 t + wl, element
# j = 4 j2 + 2 j1 + j0) and permuted to [NW, (wl j2 j1 t j0) = k, BTW]: K'^T in the scores' MMA index order
K_ORDER = gl.constexpr((0, 3, 4, 5, 2, 6, 1))
# the unpacked V codes split as [NW, BTW, g, u, j2, j1, j0] (word D/64 g + u) and permuted to
# [NW, (u j2 j1 j0 g) = m, BTW]: V'^T in the values' MMA row order
V_ORDER = gl.constexpr((0, 3, 4, 5, 6, 2, 1))


def decode_mma_layouts(warps: int, head_dim: int) -> dict[str, gl.NVMMADistributedLayout | gl.BlockedLayout]:
    """The kernel's layouts (constexpr arguments): ``MMA`` (both products; one warp per leading index), ``KW4`` /
    ``VW4`` the unpacked K / V codes ``[warps, tokens, D/8 words, 8 nibbles]`` (thread (g, t) = lane (4g + t) holds
    K words D/32 * t + [0, D/32) of token g, and V words D/64 * g + [0, D/64) of tokens 2t, 2t + 1 (+ 8, 16, ...))."""
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[warps, 1, 1], instr_shape=[1, 16, 8])
    return {"MMA": mma,
            "KW4": gl.BlockedLayout([1, 1, head_dim // 32, 8], [1, 8, 4, 1], [warps, 1, 1, 1], [3, 2, 1, 0]),
            "VW4": gl.BlockedLayout([1, 2, head_dim // 64, 8], [1, 4, 8, 1], [warps, 1, 1, 1], [1, 3, 2, 0])}


@gluon.jit
def k_dim(k, D: gl.constexpr):
    """Head dimension of the scores' MMA index k: k = 16 (2 wl + j2) + 8 j1 + 2 t + j0 is element j = 4 j2 + 2 j1 + j0
    of word D/32 * t + wl (thread t's wl-th word)."""
    j = 4 * ((k >> 4) & 1) + 2 * ((k >> 3) & 1) + (k & 1)
    return 8 * ((D // 32) * ((k >> 1) & 3) + (k >> 5)) + (j >> 1) + 4 * (j & 1)  # nibble PI[j] of the word


@gluon.jit
def v_dim(m, D: gl.constexpr):
    """Head dimension of the values' MMA row m: m = 16 (4 u + 2 j2 + j1) + 8 j0 + g is element j = 4 j2 + 2 j1 + j0
    of word D/64 * g + u."""
    j = 4 * ((m >> 5) & 1) + 2 * ((m >> 4) & 1) + ((m >> 3) & 1)
    return 8 * ((D // 64) * (m & 7) + (m >> 6)) + (j >> 1) + 4 * (j & 1)


@gluon.jit
def _tokens(L: gl.constexpr, NW: gl.constexpr, BTW: gl.constexpr):
    """[NW, BTW] token offsets w * BTW + n of a step's tile in the 2-D layout L."""
    w = gl.arange(0, NW, layout=gl.SliceLayout(1, L))[:, None]
    n = gl.arange(0, BTW, layout=gl.SliceLayout(0, L))[None, :]
    return w * BTW + n


@gluon.jit
def _words(head_ptr, t, stride_tw, L4: gl.constexpr, W: gl.constexpr, tmask, MASKED: gl.constexpr):
    """The code words ``[NW, BTW, W]`` of tokens ``t`` (layout SliceLayout(3, L4); 0 past the end when MASKED)."""
    L3: gl.constexpr = gl.SliceLayout(3, L4)
    wd = gl.arange(0, W, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))[None, None, :]
    ptrs = head_ptr + (gl.expand_dims(t, 2) * stride_tw + wd)
    if MASKED == 1:
        return gl.load(ptrs, mask=gl.expand_dims(tmask, 2), other=0)
    return gl.load(ptrs)


@gluon.jit
def _load(ptrs, mask, other, MASKED: gl.constexpr):
    """``ptrs``' values, masked when MASKED == 1."""
    if MASKED == 1:
        return gl.load(ptrs, mask=mask, other=other)
    return gl.load(ptrs)


@gluon.jit
def _magic(z, L4: gl.constexpr):
    """1024 + z and -(64 + z) (float16, exact; ``z | 0x6400`` is 1024 + z) of the zero points ``z`` [NW, BTW], as
    [NW, BTW, 1, 1] in layout L4."""
    zz = (z.to(gl.uint16) | 0x6400).to(gl.float16, bitcast=True)
    zz = gl.expand_dims(gl.expand_dims(zz, 2), 3)
    return zz, 960.0 - zz


@gluon.jit
def _load_part(t0, t_end, w_head, s_head, z_head, stride_tw, D: gl.constexpr, BTW: gl.constexpr, MMA: gl.constexpr,
               L4: gl.constexpr, MASKED: gl.constexpr):
    """A step's K (``L4`` = KW4) or V (VW4) code words, zero points and scales, in the layouts ``_scores`` /
    ``_values`` take. ``MASKED`` 1: tokens from ``t_end`` on are not loaded; 2: token indices clamped to
    [0, t_end - 1] (what they load scores -inf); 0: a whole step."""
    NW: gl.constexpr = gl.num_warps()
    t = t0 + _tokens(gl.SliceLayout(2, gl.SliceLayout(3, L4)), NW, BTW)
    ts = t0 + _tokens(gl.SliceLayout(1, MMA), NW, BTW)
    if MASKED == 2:
        t = gl.maximum(gl.minimum(t, t_end - 1), 0)
        ts = gl.maximum(gl.minimum(ts, t_end - 1), 0)
    return (_words(w_head, t, stride_tw, L4, D // 8, t < t_end, MASKED), _load(z_head + t, t < t_end, 0, MASKED),
            _load(s_head + ts, ts < t_end, 0.0, MASKED))


@gluon.jit
def _unpack(words, z, D: gl.constexpr, BTW: gl.constexpr, L4: gl.constexpr, OPERAND: gl.constexpr,
            V: gl.constexpr):
    """The code words ``[NW, BTW, D/8]`` (layout SliceLayout(3, L4)) as ``c - z`` in float16, in the MMA operand
    ``OPERAND`` ``[NW, D, BTW]``: K'^T (``_K_ASM``, K_ORDER) or, with ``V``, V'^T (``_V_ASM``, V_ORDER). The
    conversion is register renaming only (asserted at compile time)."""
    NW: gl.constexpr = gl.num_warps()
    j = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))[None, None, None, :]
    zz, nz16 = _magic(z, L4)
    args = [gl.expand_dims(words, 3) + 0 * j, zz, nz16]
    if V:
        x = gl.inline_asm_elementwise(_V_ASM, _V_CONSTRAINTS, args, gl.float16, True, 16)
        x = gl.permute(gl.reshape(x, [NW, BTW, 8, D // 64, 2, 2, 2]), V_ORDER.value)   # g, u, j2, j1, j0
    else:
        x = gl.inline_asm_elementwise(_K_ASM, _K_CONSTRAINTS, args, gl.float16, True, 8)
        x = gl.permute(gl.reshape(x, [NW, BTW, 4, D // 32, 2, 2, 2]), K_ORDER.value)   # t, wl, j2, j1, j0
    return gl.convert_layout(gl.reshape(x, [NW, D, BTW]), OPERAND, assert_trivial=True)


@gluon.jit
def _scores(kwords, kz, k_s, t0, t_end, q, m_i, l_i, D: gl.constexpr, BTW: gl.constexpr, MMA: gl.constexpr,
            KW4: gl.constexpr, MASKED: gl.constexpr):
    """Every warp's scores over its BTW tokens from ``t0 + w * BTW`` (K unpacked in registers into the B fragments
    of K'^T) and its online softmax: (p, alpha, running max, running sum). ``MASKED``: tokens from ``t_end`` on
    score -inf (the last, partial step)."""
    NW: gl.constexpr = gl.num_warps()
    k_op = _unpack(kwords, kz, D, BTW, KW4, gl.DotOperandLayout(1, MMA, 2), False)
    s = mma_v2(q, k_op, gl.zeros([NW, 16, BTW], gl.float32, MMA)) * gl.expand_dims(k_s, 1)
    if MASKED:
        s = gl.where(gl.expand_dims(t0 + _tokens(gl.SliceLayout(1, MMA), NW, BTW) < t_end, 1), s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=2))
    m_ref = gl.where(m_new > float("-inf"), m_new, 0.0)     # a warp without a token so far: alpha = p = 0
    alpha = gl.exp2(m_i - m_ref)
    p = gl.exp2(s - gl.expand_dims(m_ref, 2))
    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=2)


@gluon.jit
def _values(vwords, vz, v_s, p, alpha, acc, D: gl.constexpr, BTW: gl.constexpr, MMA: gl.constexpr,
            VW4: gl.constexpr):
    """``acc * alpha + V'^T @ P^T`` (V unpacked into the A fragments of V'^T; P^T: rows 0..7 of p * s_v, the
    scores' accumulator registers as the B fragment)."""
    NW: gl.constexpr = gl.num_warps()
    pv = (p * gl.expand_dims(v_s, 1)).to(gl.float16)
    p_lo, p_hi = gl.split(gl.permute(gl.reshape(pv, [NW, 2, 8, BTW]), [0, 2, 3, 1]))
    p_op = gl.convert_layout(gl.permute(p_lo, [0, 2, 1]), gl.DotOperandLayout(1, MMA, 2), assert_trivial=True)
    v_op = _unpack(vwords, vz, D, BTW, VW4, gl.DotOperandLayout(0, MMA, 2), True)
    a_lo, a_hi = gl.split(gl.permute(gl.reshape(alpha, [NW, 2, 8]), [0, 2, 1]))
    return mma_v2(v_op, p_op, acc * gl.expand_dims(gl.convert_layout(a_lo, gl.SliceLayout(1, MMA)), 1))


@gluon.jit
def _step(t0, t_end, q, m_i, l_i, acc, kw_head, vw_head, ks_head, kz_head, vs_head, vz_head, stride_tw,
          D: gl.constexpr, BTW: gl.constexpr, MMA: gl.constexpr, KW4: gl.constexpr, VW4: gl.constexpr,
          MASKED: gl.constexpr):
    """One step, each part's loads right before it (the V loads after the scores: fewer registers live)."""
    kw, kz, ks = _load_part(t0, t_end, kw_head, ks_head, kz_head, stride_tw, D, BTW, MMA, KW4, MASKED)
    p, alpha, m_i, l_i = _scores(kw, kz, ks, t0, t_end, q, m_i, l_i, D, BTW, MMA, KW4, MASKED)
    vw, vz, vs = _load_part(t0, t_end, vw_head, vs_head, vz_head, stride_tw, D, BTW, MMA, VW4, MASKED)
    return m_i, l_i, _values(vw, vz, vs, p, alpha, acc, D, BTW, MMA, VW4)


@gluon.jit
def kv4_decode_partial_mma_kernel(
    q_ptr, stride_qb, stride_qh,
    kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr,
    stride_cb, stride_ch, stride_ct, stride_sb, stride_sh,
    len_ptr, part_o_ptr, part_m_ptr, part_l_ptr,
    num_kv_heads, chunk, max_len, qk_scale,
    G: gl.constexpr, D: gl.constexpr, BTW: gl.constexpr, SPLITS: gl.constexpr, PREFETCH: gl.constexpr,
    MMA: gl.constexpr, KW4: gl.constexpr, VW4: gl.constexpr,   # decode_mma_layouts(num_warps, D)
):
    """Grid ``(B * Hkv, splits)``; arguments as ``kv4_decode_partial_kernel`` (q float16, G <= 8, D in 64 / 128 /
    256, code strides multiples of 4 bytes, the chunk a multiple of num_warps * BTW)."""
    NW: gl.constexpr = gl.num_warps()
    BT: gl.constexpr = NW * BTW
    QOP: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)
    ROWS: gl.constexpr = gl.SliceLayout(2, MMA)      # [NW, 16] per-row softmax state
    COLS: gl.constexpr = gl.SliceLayout(1, MMA)      # [NW, BTW] per-token values of the scores, [NW, 8] of o^T
    bh = gl.program_id(0)
    split = gl.program_id(1)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    length = gl.minimum(gl.load(len_ptr + b), max_len)
    t_start = split * chunk
    t_end = gl.minimum(t_start + chunk, length)

    # q' [NW, 16, D]: query row r (< G) at MMA index k holds q[r, k_dim(k)] * qk_scale (float16)
    r = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, QOP)))[None, :, None]
    kk = gl.arange(0, D, layout=gl.SliceLayout(0, gl.SliceLayout(1, QOP)))[None, None, :]
    qw = gl.arange(0, NW, layout=gl.SliceLayout(1, gl.SliceLayout(2, QOP)))[:, None, None]
    q_ofs = b.to(gl.int64) * stride_qb + (h * G + r) * stride_qh + k_dim(kk, D) + 0 * qw
    q = (gl.load(q_ptr + q_ofs, mask=(r < G) & (qw >= 0), other=0.0).to(gl.float32) * qk_scale).to(gl.float16)

    # per-head base pointers; token offsets in int32 from them
    kw_head = kc_ptr.to(gl.pointer_type(gl.uint32)) + (b.to(gl.int64) * stride_cb + h.to(gl.int64) * stride_ch) // 4
    vw_head = vc_ptr.to(gl.pointer_type(gl.uint32)) + (b.to(gl.int64) * stride_cb + h.to(gl.int64) * stride_ch) // 4
    s_base = b.to(gl.int64) * stride_sb + h.to(gl.int64) * stride_sh
    stride_tw = stride_ct // 4
    m_i = gl.full([NW, 16], float("-inf"), gl.float32, ROWS)
    l_i = gl.zeros([NW, 16], gl.float32, ROWS)
    acc = gl.zeros([NW, D, 8], gl.float32, MMA)
    t_full = t_start + gl.maximum(t_end - t_start, 0) // BT * BT
    kh = (kw_head, ks_ptr + s_base, kz_ptr + s_base, stride_tw)
    vh = (vw_head, vs_ptr + s_base, vz_ptr + s_base, stride_tw)
    if PREFETCH:  # registers double-buffered: the next step's loads are in flight while this step computes
        kw, kz, ks = _load_part(t_start, t_end, *kh, D, BTW, MMA, KW4, 2)
        vw, vz, vs = _load_part(t_start, t_end, *vh, D, BTW, MMA, VW4, 2)
        for t0 in range(t_start, t_full, BT):
            nkw, nkz, nks = _load_part(t0 + BT, t_end, *kh, D, BTW, MMA, KW4, 2)
            nvw, nvz, nvs = _load_part(t0 + BT, t_end, *vh, D, BTW, MMA, VW4, 2)
            p, alpha, m_i, l_i = _scores(kw, kz, ks, t0, t_end, q, m_i, l_i, D, BTW, MMA, KW4, False)
            acc = _values(vw, vz, vs, p, alpha, acc, D, BTW, MMA, VW4)
            kw, kz, ks, vw, vz, vs = nkw, nkz, nks, nvw, nvz, nvs
        if t_full < t_end:
            p, alpha, m_i, l_i = _scores(kw, kz, ks, t_full, t_end, q, m_i, l_i, D, BTW, MMA, KW4, True)
            acc = _values(vw, vz, vs, p, alpha, acc, D, BTW, MMA, VW4)
    else:
        heads = (kw_head, vw_head, ks_ptr + s_base, kz_ptr + s_base, vs_ptr + s_base, vz_ptr + s_base, stride_tw)
        for t0 in range(t_start, t_full, BT):
            m_i, l_i, acc = _step(t0, t_end, q, m_i, l_i, acc, *heads, D, BTW, MMA, KW4, VW4, False)
        if t_full < t_end:
            m_i, l_i, acc = _step(t_full, t_end, q, m_i, l_i, acc, *heads, D, BTW, MMA, KW4, VW4, True)

    # merge the warps: weights 2^(m_w - M), 0 for a warp that saw no token
    m_lo, m_hi = gl.split(gl.permute(gl.reshape(m_i, [NW, 2, 8]), [0, 2, 1]))
    l_lo, l_hi = gl.split(gl.permute(gl.reshape(l_i, [NW, 2, 8]), [0, 2, 1]))
    m_lo = gl.convert_layout(m_lo, COLS)
    l_lo = gl.convert_layout(l_lo, COLS)
    m = gl.max(m_lo, axis=0)
    wgt = gl.exp2(m_lo - gl.expand_dims(gl.where(m > float("-inf"), m, 0.0), 0))
    l_sum = gl.sum(l_lo * wgt, axis=0)
    o = gl.sum(acc * gl.expand_dims(wgt, 1), axis=0)                  # [D, 8]: o^T of rows 0..7

    OL: gl.constexpr = gl.SliceLayout(0, MMA)
    n = gl.arange(0, 8, layout=gl.SliceLayout(0, OL))
    m = gl.convert_layout(m, n.type.layout)
    l_sum = gl.convert_layout(l_sum, n.type.layout)
    ml_ofs = (bh * G + n).to(gl.int64) * SPLITS + split    # hq = b * Hq + h * G + n = (b * Hkv + h) * G + n
    gl.store(part_m_ptr + ml_ofs, m, mask=n < G)
    gl.store(part_l_ptr + ml_ofs, l_sum, mask=n < G)
    mm = gl.arange(0, D, layout=gl.SliceLayout(1, OL))[:, None]
    gl.store(part_o_ptr + ml_ofs[None, :] * D + v_dim(mm, D), o, mask=(n < G)[None, :] & (mm >= 0))
