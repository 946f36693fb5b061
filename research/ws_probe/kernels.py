import triton
import triton.language as tl


@triton.jit
def ws_fwd(
    Q, K, V, Out, LSE, T, qk_scale, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr
):
    pid_m = tl.cdiv(T, BLOCK_M) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    n_rows = tl.num_programs(1) * T
    dq = tl.make_tensor_descriptor(Q, shape=[n_rows, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    dk = tl.make_tensor_descriptor(K, shape=[n_rows, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    dv = tl.make_tensor_descriptor(V, shape=[n_rows, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    do = tl.make_tensor_descriptor(Out, shape=[n_rows, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    row0 = bh * T
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = dq.load([row0 + start_m, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in tl.range(0, start_m + BLOCK_M, BLOCK_N, warp_specialize=WS):
        k = dk.load([row0 + start_n, 0])
        s = tl.dot(q, k.T)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = dv.load([row0 + start_n, 0])
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    out = acc / l_i[:, None]
    do.store([row0 + start_m, 0], out.to(Out.dtype.element_ty))
    tl.store(LSE + bh * T + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453)


@triton.jit
def ws_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    T,
    qk_scale,
    sm_scale,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WS: tl.constexpr,
):
    """Causal dk, dv of kv block ``program_id(0)`` of row ``program_id(1)`` (LSE in natural log; DELTA =
    rowsum(dO * O)), every load through a descriptor made here. (A host-descriptor variant, which hung when
    specialised, was removed with ``hang.py``: commit b91b4c2 has both.)"""
    n_rows = tl.num_programs(1) * T
    q_desc = tl.make_tensor_descriptor(Q, shape=[n_rows, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    do_desc = tl.make_tensor_descriptor(DO, shape=[n_rows, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    lse_desc = tl.make_tensor_descriptor(LSE, shape=[n_rows], strides=[1], block_shape=[BLOCK_M])
    delta_desc = tl.make_tensor_descriptor(DELTA, shape=[n_rows], strides=[1], block_shape=[BLOCK_M])
    k_desc = tl.make_tensor_descriptor(K, shape=[n_rows, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    v_desc = tl.make_tensor_descriptor(V, shape=[n_rows, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    row0 = bh * T
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kv_off = (row0 + offs_n)[:, None].to(tl.int64) * D + offs_d[None, :]
    k = k_desc.load([row0 + start_n, 0])
    v = v_desc.load([row0 + start_n, 0])
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    m_lo = (start_n // BLOCK_M) * BLOCK_M
    for start_m in tl.range(m_lo, T, BLOCK_M, warp_specialize=WS):
        q = q_desc.load([row0 + start_m, 0])
        do = do_desc.load([row0 + start_m, 0])
        lse = lse_desc.load([row0 + start_m]) * 1.4426950408889634
        delta = delta_desc.load([row0 + start_m])
        st = tl.dot(k, q.T) * qk_scale
        offs_m = start_m + tl.arange(0, BLOCK_M)
        st = tl.where(offs_m[None, :] >= offs_n[:, None], st, float("-inf"))
        pt = tl.math.exp2(st - lse[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv)
        dpt = tl.dot(v, do.T)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk)
    tl.store(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty))


@triton.jit
def ws_dq(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    T,
    qk_scale,
    sm_scale,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WS: tl.constexpr,
):
    pid_m = tl.cdiv(T, BLOCK_M) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    n_rows = tl.num_programs(1) * T
    dqd = tl.make_tensor_descriptor(Q, shape=[n_rows, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    ddo = tl.make_tensor_descriptor(DO, shape=[n_rows, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    dkd = tl.make_tensor_descriptor(K, shape=[n_rows, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    dvd = tl.make_tensor_descriptor(V, shape=[n_rows, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    dl = tl.make_tensor_descriptor(LSE, shape=[n_rows], strides=[1], block_shape=[BLOCK_M])
    dd = tl.make_tensor_descriptor(DELTA, shape=[n_rows], strides=[1], block_shape=[BLOCK_M])
    dout = tl.make_tensor_descriptor(DQ, shape=[n_rows, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    row0 = bh * T
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = dqd.load([row0 + start_m, 0])
    do = ddo.load([row0 + start_m, 0])
    lse = dl.load([row0 + start_m]) * 1.4426950408889634
    delta = dd.load([row0 + start_m])
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in tl.range(0, start_m + BLOCK_M, BLOCK_N, warp_specialize=WS):
        k = dkd.load([row0 + start_n, 0])
        v = dvd.load([row0 + start_n, 0])
        s = tl.dot(q, k.T) * qk_scale
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, v.T)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    dout.store([row0 + start_m, 0], (dq * sm_scale).to(DQ.dtype.element_ty))
