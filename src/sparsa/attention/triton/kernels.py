"""Triton kernels of alpha-entmax attention: forward (max, threshold, output) and backward (dQ; dK, dV).

Notation per query row: s = scale q.k + ALiBi (masked keys -inf), m = max s,
z = (alpha - 1)(s - m) <= 0, weights p = [z - tau]_+^(1/(alpha-1)) with tau
in [-1, -n^(1-alpha)] such that sum p = 1. The forward streams over key tiles
three times: the row maxima, then safeguarded Newton passes for tau (Newton
from the left of a convex decreasing function, with bisection on the bracket
when a step leaves it), then the output. It stores m and tau, from which the
backward recomputes every weight, and U = sum g v / sum g with g = p^(2-alpha)
(the entmax Jacobian is diag(g) - g g^T / sum g), plus, when alpha is learnt,
W = sum p log p v and H = sum p log p for its gradient.

Starting bracket: the first pass also keeps each row's second-largest score.
If its z is at most -1 the maximum alone has weight, tau = -1 exactly and
the row needs no Newton pass (the usual case in trained sparse heads: the
forward then reads the keys twice); otherwise the two largest z give a left
end above -1. The first Newton pass counts the z above LEVELS evenly spaced
levels of the bracket [left end, -n^(1-alpha)]. Valuing each z at the level
just below it (the maximum at 0) undercounts f, so the root of that step
function, found in registers, is a lower bound on tau within one level's
spacing of it; Newton continues from there. For alpha <= 1.5 (f'' falls as
tau rises) a Newton step from the left whose bound f'' step^2 / 2 on the
remaining f is within tolerance ends the solve without another pass.
Gaussian rows then take 4-5 Newton passes instead of 6-12 (alpha 1.25 to 2).

Offsets from the batch and head indices are 64-bit: a tensor of 2^31 elements
(B=16, H=16, N=64k, D=128) would overflow 32-bit products of index and stride.

Block sparsity: under a causal mask with ALiBi the first pass goes nearest
tile first and does not score a key tile whose bound, |q| max|k| (the tile's
largest key norm) plus the largest bias a row sees in it, is at least
1 / (alpha - 1) below every row's running maximum: its z are all at most
-1 <= tau, so its weights are zero at any tau, its maximum stays -inf and no
later pass or the backward reads it. It stores each other (query tile, key
tile)'s largest score. A tile whose largest score is at most min over the tile's rows of
m + tau / (alpha - 1) holds only zero weights at that tau, so the Newton
passes (at the current tau) and the output pass skip it without loading its
keys or values. The output pass marks the tiles it kept in one byte each,
which is all the backward keeps of this (4x less than the maxima), and both
backward kernels skip the unmarked ones.
"""

from __future__ import annotations

import triton
import triton.language as tl

NEWTON_TOLERANCE = 1e-6
MAX_PASSES = 60
LEVELS = 16
BOUND_ITERATIONS = 8


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    return tl.dot(a.to(b.dtype), b, input_precision=PRECISION)


@triton.jit
def _load_tile(base, offs_n, offs_d, stride_n, stride_d, n_k, WIDTH: tl.constexpr):
    mask = (offs_n[:, None] < n_k) & (offs_d[None, :] < WIDTH)
    return tl.load(base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _real_keys(Lengths, b, n_k, PAD: tl.constexpr):
    """[lo, hi): the real keys of batch entry b (PAD 0: none, 1: right padding, 2: left padding)."""
    if PAD == 0:
        lo = 0
        hi = n_k
    elif PAD == 1:
        lo = 0
        hi = tl.load(Lengths + b)
    else:
        lo = n_k - tl.load(Lengths + b)
        hi = n_k
    return lo, hi


@triton.jit
def _key_range(
    pid_m, n_q, n_k, lo, hi, window, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Start of the first key tile and end of the keys that a query tile can see."""
    first = lo
    end = hi
    if IS_CAUSAL:
        first = tl.maximum(lo, n_k - n_q + pid_m * BLOCK_M - window + 1)
        end = tl.minimum(hi, n_k - n_q + (pid_m + 1) * BLOCK_M)
    return (first // BLOCK_N) * BLOCK_N, end


@triton.jit
def _visible_keys(q_pos, rows, lo, hi, window, IS_CAUSAL: tl.constexpr):
    """The number of keys each query row sees (0 for rows past the queries)."""
    first = lo
    end = hi
    if IS_CAUSAL:
        first = tl.maximum(lo, q_pos - window + 1)
        end = tl.minimum(hi, q_pos + 1)
    return tl.where(rows, tl.maximum(end - first, 0), 0).to(tl.float32)


@triton.jit
def _scores(q, k, offs_n, q_pos, lo, hi, window, slope, scale, softcap,
            IS_CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
            PRECISION: tl.constexpr):  # fmt: skip
    """(BLOCK_M, BLOCK_N) scores of a query tile against the key tile k at offs_n, -inf where masked."""
    s = _dot(q, tl.trans(k), PRECISION) * scale
    if HAS_SOFTCAP:
        # c tanh(s / c) from exp(-2 |s| / c) <= 1: no overflow, and no libdevice call.
        t = tl.exp(-2.0 * tl.abs(s) / softcap)
        s = tl.where(s < 0, -softcap, softcap) * (1.0 - t) / (1.0 + t)
    if HAS_ALIBI:
        s += slope * (offs_n[None, :] - q_pos[:, None]).to(tl.float32)
    keep = (offs_n[None, :] >= lo) & (offs_n[None, :] < hi)
    if IS_CAUSAL:
        keep = keep & (offs_n[None, :] <= q_pos[:, None]) & (offs_n[None, :] > q_pos[:, None] - window)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _cap_slope(s, offs_n, q_pos, slope, softcap, HAS_ALIBI: tl.constexpr):
    """d capped / d score at scores s (after their ALiBi bias and mask), 0 where masked."""
    content = s
    if HAS_ALIBI:
        content = s - slope * (offs_n[None, :] - q_pos[:, None]).to(tl.float32)
    ratio = tl.where(s == float("-inf"), 0.0, content / softcap)
    return tl.where(s == float("-inf"), 0.0, 1.0 - ratio * ratio)


@triton.jit
def _powers(d, inv):
    """d^(1/(alpha-1)) and d^(1/(alpha-1) - 1) for d > 0, 0 elsewhere (the weight p and g = p^(2-alpha))."""
    positive = d > 0
    safe = tl.where(positive, d, 1.0)
    g = tl.where(positive, tl.exp((inv - 1.0) * tl.log(safe)), 0.0)
    return g * safe, g


@triton.jit
def _head_constants(Alpha, Slopes, b, h, slope_stride, HAS_ALIBI: tl.constexpr):
    """alpha - 1, its inverse and the ALiBi slope of head h in batch entry b."""
    am1 = tl.load(Alpha + h).to(tl.float32) - 1.0
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + b * slope_stride + h).to(tl.float32)
    return am1, 1.0 / am1, slope


@triton.jit
def _zero_cut(m, tau, inv, rows):
    """The score at or below which every weight of the tile's rows is zero (+inf for no row)."""
    return tl.min(tl.where(rows, m + tau * inv, float("inf")), 0)


@triton.jit
def _threshold_pass(
    q, k_base, tile_max, m, tau, cut, lowest, spacing, start, end, offs_d, skn, skd, n_k, q_pos,
    lo, hi, window, slope, scale, softcap, am1, inv, sink_z,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LEVELS: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
    COUNT_LEVELS: tl.constexpr,
):  # fmt: skip
    """Sums of d^p, d^(p-1) and d^(p-2) over a row's keys and its sink (z = sink_z, -inf for none) at
    tau (p = 1/(alpha-1)), skipping the key tiles at or below cut; with COUNT_LEVELS also the number of
    z above each level lowest + j spacing."""
    total = tl.zeros([BLOCK_M], tl.float32)
    slope_sum = tl.zeros([BLOCK_M], tl.float32)
    curvature = tl.zeros([BLOCK_M], tl.float32)
    above = tl.zeros([BLOCK_M, LEVELS], tl.float32)
    level_ids = tl.arange(0, LEVELS)
    for first in range(start, end, BLOCK_N):
        if tl.load(tile_max + first // BLOCK_N) > cut:
            offs_n = first + tl.arange(0, BLOCK_N)
            k = _load_tile(k_base, offs_n, offs_d, skn, skd, n_k, HEAD_DIM)
            s = _scores(
                q, k, offs_n, q_pos, lo, hi, window, slope, scale, softcap, IS_CAUSAL, HAS_ALIBI, HAS_SOFTCAP,
                PRECISION,
            )  # fmt: skip
            z = (s - m[:, None]) * am1
            d = z - tau[:, None]
            p, g = _powers(d, inv)
            total += tl.sum(p, 1)
            slope_sum += tl.sum(g, 1)
            if inv >= 2.0:  # f'' serves the early stop, which holds for alpha <= 1.5 only
                curvature += tl.sum(tl.where(d > 0, g / tl.where(d > 0, d, 1.0), 0.0), 1)
            if COUNT_LEVELS:
                for j in tl.static_range(LEVELS):
                    count = tl.sum((z > (lowest + j * spacing)[:, None]).to(tl.float32), 1)
                    above += tl.where(level_ids[None, :] == j, count[:, None], 0.0)
    d = sink_z - tau
    p, g = _powers(d, inv)
    total += p
    slope_sum += g
    if inv >= 2.0:
        curvature += tl.where(d > 0, g / tl.where(d > 0, d, 1.0), 0.0)
    if COUNT_LEVELS:
        above += (sink_z[:, None] > lowest[:, None] + level_ids[None, :] * spacing[:, None]).to(tl.float32)
    return total, slope_sum, curvature, above


@triton.jit
def _pair_bound(runner_up, inv, ITERATIONS: tl.constexpr):
    """A lower bound on tau from the two largest z of a row, 0 and runner_up: the root of
    (-t)^p + (runner_up - t)_+^p = 1 (-1 when runner_up <= -1), by Newton from t = -1, which stays
    left of it."""
    t = tl.full(runner_up.shape, -1.0, tl.float32)
    for _ in tl.static_range(ITERATIONS):
        top_p, top_g = _powers(-t, inv)
        next_p, next_g = _powers(runner_up - t, inv)
        excess = top_p + next_p - 1.0
        t = tl.where(excess > 0, t + excess / tl.maximum(inv * (top_g + next_g), 1e-30), t)
    return t


@triton.jit
def _level_bound(above, lowest, spacing, inv, LEVELS: tl.constexpr, ITERATIONS: tl.constexpr):
    """A lower bound on tau from the counts of z above the levels lowest + j spacing.

    Each z other than the maximum is valued at the level just below it, the maximum at 0:
    g(t) = (-t)^p + sum_j (above_j - 1) ((level_j - t)_+^p - (level_j - spacing - t)_+^p) <= f(t),
    so Newton on g from t = lowest (convex, decreasing) stays at or below the root of f.
    """
    levels = lowest[:, None] + spacing[:, None] * tl.arange(0, LEVELS)[None, :].to(tl.float32)
    others = tl.maximum(above - 1.0, 0.0)
    t = lowest
    for _ in tl.static_range(ITERATIONS):
        top_p, top_g = _powers(-t, inv)
        upper_p, upper_g = _powers(levels - t[:, None], inv)
        lower_p, lower_g = _powers(levels - spacing[:, None] - t[:, None], inv)
        excess = top_p + tl.sum(others * (upper_p - lower_p), 1) - 1.0
        derivative = inv * (top_g + tl.sum(others * (upper_g - lower_g), 1))
        t = tl.where(excess > 0, t + excess / tl.maximum(derivative, 1e-30), t)
    return t


@triton.jit
def _newton_update(tau, lower, upper, finished, total, slope_sum, curvature, bound, inv, tolerance):
    """One safeguarded Newton step on f(tau) = sum p - 1, never below bound (a lower bound on the root)."""
    f = total - 1.0
    step = f / tl.maximum(inv * slope_sum, 1e-30)
    converged = finished | (tl.abs(f) <= tolerance)
    lower = tl.where(f > 0, tau, lower)
    upper = tl.where(f < 0, tau, upper)
    newton = tau + step
    # From the left, f(newton) <= f''(tau) step^2 / 2 when f'' only falls as tau rises, as for p >= 2.
    remaining = tl.where(inv >= 2.0, 0.5 * inv * (inv - 1.0) * curvature * step * step, float("inf"))
    final = (f > 0) & (newton >= bound) & (remaining <= tolerance)
    # The root can be the count bound itself (all visible scores tied), where rounding puts Newton's
    # step just past it: clamping there, rather than bisecting, ends the solve at the next pass.
    newton = tl.minimum(tl.maximum(newton, bound), upper)
    inside = newton > lower
    tau = tl.where(converged, tau, tl.where(inside, newton, 0.5 * (lower + upper)))
    return tau, lower, upper, converged | (final & inside)


@triton.jit
def _forward_kernel(
    Q, K, V, Out, U, W, Stats, TileMax, Live, Passes, Unscored, KeyNorms, Alpha, Slopes, Lengths, Sinks,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    n_heads, n_q, n_k, group, scale, slope_stride, window, softcap, n_tiles_m, n_tiles_n, tolerance,
    max_passes,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, PAD: tl.constexpr, ALPHA_GRAD: tl.constexpr, PRECISION: tl.constexpr,
    LEVELS: tl.constexpr, BOUND_ITERATIONS: tl.constexpr, HAS_SINKS: tl.constexpr,
    PRESCORE: tl.constexpr,
):  # fmt: skip
    """TileMax (B * H, n_tiles_m, n_tiles_n) arrives filled with -inf (tiles no query sees stay so)
    and Live, int8 of the same shape, with zeros: the output pass sets the tiles with a nonzero
    weight to 1 for the backward. Passes (B * H, n_tiles_m) receives each query tile's Newton passes.
    Sinks (H,): with HAS_SINKS, a logit per head that joins every row's threshold and weights as one
    more score without a value. With PRESCORE (causal ALiBi), KeyNorms (B * Hkv, n_tiles_n) holds each
    key tile's largest key norm, and Unscored (B * H, n_tiles_m, 2) receives the key tiles the first
    pass ruled out before scoring them and the key tiles in the query tile's range."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    hk = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_nb = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = offs_m < n_q
    q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqm, sqd, n_q, HEAD_DIM)
    q_pos = offs_m + (n_k - n_q)
    am1, inv, slope = _head_constants(Alpha, Slopes, b, h, slope_stride, HAS_ALIBI)
    lo, hi = _real_keys(Lengths, b, n_k, PAD)
    start, end = _key_range(pid_m, n_q, n_k, lo, hi, window, IS_CAUSAL, BLOCK_M, BLOCK_N)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    tile_max = TileMax + (pid_bh * n_tiles_m + pid_m) * n_tiles_n

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    second = tl.full([BLOCK_M], float("-inf"), tl.float32)
    # Rows with a NaN or +inf score have no threshold; they output NaN, as torch's softmax does.
    non_finite = tl.zeros([BLOCK_M], tl.int32)
    tiles = tl.maximum((end - start + BLOCK_N - 1) // BLOCK_N, 0)
    unscored = tl.full([], 0, tl.int32)
    if PRESCORE:
        # |q . k| <= |q| |k|; the margin covers the rounding of the scores (tf32: 1e-3 of it).
        q_norm = tl.sqrt(tl.sum(q.to(tl.float32) * q.to(tl.float32), 1)) * scale * 1.01
        key_norms = KeyNorms + (b * (n_heads // group) + hk) * n_tiles_n
    # Nearest tiles first: with ALiBi their maxima rule the far tiles out before they are scored.
    for i in range(0, tiles):
        first = start + (tiles - 1 - i) * BLOCK_N
        ruled_out = False
        if PRESCORE:
            # A key whose z = (alpha - 1)(s - m) is at most -1 <= tau has zero weight; the running m
            # is at most the row's, and a tile that some row's bound cannot rule out is scored.
            nearest = tl.minimum(tl.minimum(first + BLOCK_N, hi) - 1, q_pos)
            farthest = tl.maximum(tl.maximum(first, lo), q_pos - window + 1)
            sees = rows & (farthest <= nearest)
            content = q_norm * tl.load(key_norms + first // BLOCK_N)
            if HAS_SOFTCAP:
                t = tl.exp(-2.0 * content / softcap)
                content = softcap * (1.0 - t) / (1.0 + t)
            # The largest bias of the keys a row sees here: at the nearest (slope >= 0) or the farthest.
            best_key = tl.where(slope >= 0, nearest, farthest)
            bound = content + slope * (best_key - q_pos).to(tl.float32)
            open_rows = tl.sum((sees & ~(bound <= m - inv)).to(tl.int32))
            ruled_out = open_rows == 0
        if ruled_out:
            # Every weight of the tile is zero at any tau the later passes try: they skip it (-inf).
            unscored += 1
        else:
            offs_n = first + offs_nb
            k = _load_tile(k_base, offs_n, offs_d, skn, skd, n_k, HEAD_DIM)
            s = _scores(
                q, k, offs_n, q_pos, lo, hi, window, slope, scale, softcap, IS_CAUSAL, HAS_ALIBI,
                HAS_SOFTCAP, PRECISION,
            )  # fmt: skip
            s = tl.where(rows[:, None], s, float("-inf"))
            non_finite += tl.sum(((s != s) | (s == float("inf"))).to(tl.int32), 1)
            row_max, at = tl.max(s, 1, return_indices=True)
            row_second = tl.max(tl.where(offs_nb[None, :] == at[:, None], float("-inf"), s), 1)
            tl.store(tile_max + first // BLOCK_N, tl.max(row_max, 0))
            second = tl.maximum(tl.minimum(m, row_max), tl.maximum(second, row_second))
            m = tl.maximum(m, row_max)
    if PRESCORE:
        counts = Unscored + (pid_bh * n_tiles_m + pid_m) * 2
        tl.store(counts, unscored)
        tl.store(counts + 1, tiles)
    sink = tl.full([BLOCK_M], float("-inf"), tl.float32)
    if HAS_SINKS:
        sink = tl.where(rows, tl.load(Sinks + h).to(tl.float32), float("-inf"))
        second = tl.maximum(tl.minimum(m, sink), second)
        m = tl.maximum(m, sink)
    count = _visible_keys(q_pos, rows, lo, hi, window, IS_CAUSAL) + (sink > float("-inf")).to(tl.float32)
    seen = count > 0
    m = tl.where(seen, m, 0.0)
    runner_up = tl.where(seen, (second - m) * am1, float("-inf"))
    sink_z = (sink - m) * am1

    # tau in [-1, -count^(1 - alpha)]: f(-1) >= 0 (the maximum alone has weight 1), f(upper) <= 0.
    # The two largest scores tighten the left end; a row whose runner-up has z <= -1 has tau = -1 exactly.
    lower = _pair_bound(runner_up, inv, BOUND_ITERATIONS)
    upper = -tl.exp(-am1 * tl.log(tl.maximum(count, 1.0)))
    tau = lower
    failed = non_finite > 0
    finished = (~seen) | (runner_up <= -1.0) | failed
    passes = tl.full([], 0, tl.int32)
    spacing = (upper - lower) / (LEVELS - 1)
    if tl.sum((~finished).to(tl.int32)) > 0:
        total, slope_sum, curvature, above = _threshold_pass(
            q, k_base, tile_max, m, tau, _zero_cut(m, tau, inv, seen), lower, spacing, start, end, offs_d,
            skn, skd, n_k, q_pos, lo, hi, window, slope, scale, softcap, am1, inv, sink_z,
            HEAD_DIM, BLOCK_M, BLOCK_N, LEVELS, IS_CAUSAL, HAS_ALIBI, HAS_SOFTCAP, PRECISION, True,
        )  # fmt: skip
        bound = _level_bound(above, lower, spacing, inv, LEVELS, BOUND_ITERATIONS)
        tau, lower, upper, finished = _newton_update(
            tau, lower, upper, finished, total, slope_sum, curvature, bound, inv, tolerance
        )
        passes += 1
    while (tl.sum((~finished).to(tl.int32)) > 0) & (passes < max_passes):
        total, slope_sum, curvature, _ = _threshold_pass(
            q, k_base, tile_max, m, tau, _zero_cut(m, tau, inv, seen), lower, spacing, start, end, offs_d,
            skn, skd, n_k, q_pos, lo, hi, window, slope, scale, softcap, am1, inv, sink_z,
            HEAD_DIM, BLOCK_M, BLOCK_N, LEVELS, IS_CAUSAL, HAS_ALIBI, HAS_SOFTCAP, PRECISION, False,
        )  # fmt: skip
        tau, lower, upper, finished = _newton_update(
            tau, lower, upper, finished, total, slope_sum, curvature, lower, inv, tolerance
        )
        passes += 1
    tl.store(Passes + pid_bh * n_tiles_m + pid_m, passes)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc_w = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    p_sum = tl.zeros([BLOCK_M], tl.float32)
    g_sum = tl.zeros([BLOCK_M], tl.float32)
    entropy = tl.zeros([BLOCK_M], tl.float32)
    support = tl.zeros([BLOCK_M], tl.float32)
    tau = tl.where(seen, tau, float("inf"))
    # A failed row marks every tile it sees live, so that the backward reaches them all with NaN.
    tau = tl.where(failed, float("-inf"), tau)
    m = tl.where(failed, 0.0, m)
    cut = _zero_cut(m, tau, inv, seen)
    live = Live + (pid_bh * n_tiles_m + pid_m) * n_tiles_n
    for first in range(start, end, BLOCK_N):
        if tl.load(tile_max + first // BLOCK_N) > cut:
            tl.store(live + first // BLOCK_N, 1)
            offs_n = first + offs_nb
            k = _load_tile(k_base, offs_n, offs_d, skn, skd, n_k, HEAD_DIM)
            s = _scores(
                q, k, offs_n, q_pos, lo, hi, window, slope, scale, softcap, IS_CAUSAL, HAS_ALIBI, HAS_SOFTCAP,
                PRECISION,
            )  # fmt: skip
            d = (s - m[:, None]) * am1 - tau[:, None]
            p, g = _powers(d, inv)
            v = _load_tile(v_base, offs_n, offs_dv, svn, svd, n_k, VALUE_DIM)
            acc += _dot(p, v, PRECISION)
            acc_g += _dot(g, v, PRECISION)
            p_sum += tl.sum(p, 1)
            g_sum += tl.sum(g, 1)
            support += tl.sum((d > 0).to(tl.float32), 1)
            if ALPHA_GRAD:
                p_log_p = tl.where(d > 0, p * inv * tl.log(tl.where(d > 0, d, 1.0)), 0.0)
                entropy += tl.sum(p_log_p, 1)
                acc_w += _dot(p_log_p, v, PRECISION)
    # The sink's weight joins the normalisers; it adds nothing to the outputs.
    d_sink = sink_z - tau
    p_sink, g_sink = _powers(d_sink, inv)
    p_sum += p_sink
    g_sum += g_sink
    if ALPHA_GRAD:
        entropy += tl.where(d_sink > 0, p_sink * inv * tl.log(tl.where(d_sink > 0, d_sink, 1.0)), 0.0)
    p_sum = tl.where(p_sum > 0, p_sum, 1.0)
    g_sum = tl.where(g_sum > 0, g_sum, 1.0)
    out_mask = rows[:, None] & (offs_dv[None, :] < VALUE_DIM)
    out = Out + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod
    result = tl.where(failed[:, None], float("nan"), acc / p_sum[:, None])
    tl.store(out, result.to(Out.dtype.element_ty), mask=out_mask)
    # 64-bit scalar bases first, so that the per-element offsets stay 32-bit.
    row_base = pid_bh * n_q
    aux_offsets = offs_m[:, None] * VALUE_DIM + offs_dv[None, :]
    u = (acc_g / g_sum[:, None]).to(U.dtype.element_ty)
    tl.store(U + row_base * VALUE_DIM + aux_offsets, u, mask=out_mask)
    if ALPHA_GRAD:
        tl.store(W + row_base * VALUE_DIM + aux_offsets, acc_w, mask=out_mask)
    stats = Stats + row_base * 4 + offs_m * 4
    tl.store(stats, tl.where(failed, float("nan"), m), mask=rows)
    tl.store(stats + 1, tl.where(failed, float("nan"), tau), mask=rows)
    tl.store(stats + 2, entropy, mask=rows)
    tl.store(stats + 3, support, mask=rows)


@triton.jit
def _delta_kernel(
    DO, U, Delta, sob, soh, som, sod, n_heads, n_q,
    VALUE_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """delta = dO . U for a tile of query rows, which both backward kernels (launched after) subtract."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_base = pid_bh * n_q
    do = _load_tile(DO + b * sob + h * soh, offs_m, offs_dv, som, sod, n_q, VALUE_DIM)
    u = _load_tile(U + row_base * VALUE_DIM, offs_m, offs_dv, VALUE_DIM, 1, n_q, VALUE_DIM)
    delta = tl.sum(do.to(tl.float32) * u.to(tl.float32), 1)
    tl.store(Delta + row_base + offs_m, delta, mask=offs_m < n_q)


@triton.jit
def _weights_and_grads(s, m, tau, am1, inv, do, v, delta, PRECISION: tl.constexpr):
    """p, and dS = g (dO v^T - delta) for one tile; NaN on the visible keys of a row stored as NaN."""
    d = (s - m[:, None]) * am1 - tau[:, None]
    p, g = _powers(d, inv)
    broken = (d != d) & (s != float("-inf"))
    p = tl.where(broken, float("nan"), p)
    g = tl.where(broken, float("nan"), g)
    return p, g * (_dot(do, tl.trans(v), PRECISION) - delta[:, None])


@triton.jit
def _backward_query_kernel(
    Q, K, V, DO, DQ, Stats, Live, Delta, Alpha, Slopes, Lengths,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    n_heads, n_q, n_k, group, scale, slope_stride, window, softcap, n_tiles_m, n_tiles_n,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, PAD: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dQ of one query tile; DO has O's strides, DQ has Q's."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    hk = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_nb = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = offs_m < n_q
    q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqm, sqd, n_q, HEAD_DIM)
    do = _load_tile(DO + b * sob + h * soh, offs_m, offs_dv, som, sod, n_q, VALUE_DIM)
    row_base = pid_bh * n_q
    stats = Stats + row_base * 4 + offs_m * 4
    m = tl.load(stats, mask=rows, other=0.0)
    tau = tl.load(stats + 1, mask=rows, other=float("inf"))
    delta = tl.load(Delta + row_base + offs_m, mask=rows, other=0.0)
    q_pos = offs_m + (n_k - n_q)
    am1, inv, slope = _head_constants(Alpha, Slopes, b, h, slope_stride, HAS_ALIBI)
    lo, hi = _real_keys(Lengths, b, n_k, PAD)
    start, end = _key_range(pid_m, n_q, n_k, lo, hi, window, IS_CAUSAL, BLOCK_M, BLOCK_N)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    live = Live + (pid_bh * n_tiles_m + pid_m) * n_tiles_n
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for first in range(start, end, BLOCK_N):
        if tl.load(live + first // BLOCK_N) != 0:
            offs_n = first + offs_nb
            k = _load_tile(k_base, offs_n, offs_d, skn, skd, n_k, HEAD_DIM)
            s = _scores(
                q, k, offs_n, q_pos, lo, hi, window, slope, scale, softcap, IS_CAUSAL, HAS_ALIBI, HAS_SOFTCAP,
                PRECISION,
            )  # fmt: skip
            v = _load_tile(v_base, offs_n, offs_dv, svn, svd, n_k, VALUE_DIM)
            _, ds = _weights_and_grads(s, m, tau, am1, inv, do, v, delta, PRECISION)
            if HAS_SOFTCAP:
                ds = ds * _cap_slope(s, offs_n, q_pos, slope, softcap, HAS_ALIBI)
            dq += _dot(ds, k, PRECISION)
    dq_mask = rows[:, None] & (offs_d[None, :] < HEAD_DIM)
    dq_ptrs = DQ + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=dq_mask)


@triton.jit
def _backward_key_kernel(
    Q, K, V, DO, DK, DV, Stats, Live, Delta, Alpha, Slopes, Lengths,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    n_heads, n_kv_heads, n_q, n_k, group, scale, slope_stride, window, softcap, n_tiles_m, n_tiles_n,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, PAD: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dK, dV of a key tile, summed over the query heads of its group (no atomics); DK, DV: K, V strides."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_tile(K + b * skb + hk * skh, offs_n, offs_d, skn, skd, n_k, HEAD_DIM)
    v = _load_tile(V + b * svb + hk * svh, offs_n, offs_dv, svn, svd, n_k, VALUE_DIM)
    lo, hi = _real_keys(Lengths, b, n_k, PAD)
    offset = n_k - n_q
    first_query = 0
    last_query = n_q
    if IS_CAUSAL:
        first_query = tl.maximum(pid_n * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M
        # The last query whose window reaches the tile's last key.
        last_query = tl.minimum(n_q, (pid_n + 1) * BLOCK_N - 1 + window - offset)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for j in range(0, group):
        h = hk * group + j
        am1, inv, slope = _head_constants(Alpha, Slopes, b, h, slope_stride, HAS_ALIBI)
        row_base = (b * n_heads + h) * n_q
        live = Live + (b * n_heads + h) * n_tiles_m * n_tiles_n + pid_n
        for start_m in range(first_query, last_query, BLOCK_M):
            if tl.load(live + (start_m // BLOCK_M) * n_tiles_n) != 0:
                offs_m = start_m + offs_mb
                rows = offs_m < n_q
                stats = Stats + row_base * 4 + offs_m * 4
                m = tl.load(stats, mask=rows, other=0.0)
                tau = tl.load(stats + 1, mask=rows, other=float("inf"))
                q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqm, sqd, n_q, HEAD_DIM)
                do = _load_tile(DO + b * sob + h * soh, offs_m, offs_dv, som, sod, n_q, VALUE_DIM)
                delta = tl.load(Delta + row_base + offs_m, mask=rows, other=0.0)
                q_pos = offs_m + offset
                s = _scores(
                    q, k, offs_n, q_pos, lo, hi, window, slope, scale, softcap, IS_CAUSAL, HAS_ALIBI,
                    HAS_SOFTCAP, PRECISION,
                )  # fmt: skip
                p, ds = _weights_and_grads(s, m, tau, am1, inv, do, v, delta, PRECISION)
                if HAS_SOFTCAP:
                    ds = ds * _cap_slope(s, offs_n, q_pos, slope, softcap, HAS_ALIBI)
                dv += _dot(tl.trans(p), do, PRECISION)
                dk += _dot(tl.trans(ds), q, PRECISION)
    k_mask = (offs_n[:, None] < n_k) & (offs_d[None, :] < HEAD_DIM)
    v_mask = (offs_n[:, None] < n_k) & (offs_dv[None, :] < VALUE_DIM)
    dk_ptrs = DK + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd
    dv_ptrs = DV + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=k_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=v_mask)
