"""The Triton backend against the dense reference; on CPU through Triton's interpreter."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")  # on CPU it runs in the interpreter, which conftest.py switches on

import sparsa
from sparsa.attention import KeyPadding
from sparsa.attention.masks import ScoreBias
from sparsa.attention.triton import TileSizes, triton_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _inputs(batch, heads, kv_heads, n_q, n_k, dim, dtype, value_dim=None):
    q = torch.randn(batch, heads, n_q, dim, device=DEVICE).to(dtype).requires_grad_()
    k = torch.randn(batch, kv_heads, n_k, dim, device=DEVICE).to(dtype).requires_grad_()
    v = torch.randn(batch, kv_heads, n_k, value_dim or dim, device=DEVICE).to(dtype).requires_grad_()
    return q, k, v


def _compare(q, k, v, dtype, **options):
    out = sparsa.attention(q, k, v, backend="triton", **options)
    ref = sparsa.attention(q.float(), k.float(), v.float(), backend="reference", **options)
    grad = torch.randn_like(ref)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    inputs = [q, k, v]
    alpha = options.get("alpha")
    if isinstance(alpha, torch.Tensor) and alpha.requires_grad:
        inputs.append(alpha)
    got = torch.autograd.grad(out, inputs, grad.to(dtype))
    expected = torch.autograd.grad(ref, inputs, grad)
    for name, a, b in zip(("q", "k", "v", "alpha"), got, expected, strict=False):
        scale = max(1.0, float(b.abs().max()))
        error = float((a.float() - b).abs().max())
        assert error <= tol * scale * 4, f"gradient of {name}: error {error:.2e} at scale {scale:.2f}"


@pytest.mark.parametrize("length", [1, 17, 64, 100, 128, 130])
@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
def test_causal_lengths_and_alpha(length, alpha):
    q, k, v = _inputs(1, 2, 1, length, length, 16, torch.float32)
    _compare(q, k, v, torch.float32, alpha=alpha, is_causal=True)


@pytest.mark.parametrize(("n_q", "n_k"), [(17, 17), (1, 100), (40, 130)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_bidirectional_and_queries_at_the_end_of_the_keys(n_q, n_k, is_causal):
    q, k, v = _inputs(2, 4, 2, n_q, n_k, 32, torch.float32, value_dim=24)
    _compare(q, k, v, torch.float32, alpha=1.5, is_causal=is_causal)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_alibi_and_grouped_heads(side):
    q, k, v = _inputs(3, 4, 2, 70, 70, 16, torch.float32)
    padding = KeyPadding(torch.tensor([70, 33, 1], device=DEVICE), side=side)
    slopes = torch.tensor([[0.5, 0.25, 0.0, 1.0]] * 3, device=DEVICE)
    _compare(q, k, v, torch.float32, alpha=1.5, is_causal=True, attn_mask=padding, alibi_slopes=slopes)


def test_inputs_and_output_gradient_in_other_layouts():
    """(B, N, H, D) tensors seen as (B, H, N, D), as a model that splits heads passes them, and an
    output gradient that arrives in that layout too."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 50, 4, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    weights = torch.randn(2, 50, 4, 16, device=DEVICE)
    grads = []
    for backend in ("triton", "reference"):
        out = sparsa.attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, backend=backend
        )
        loss = (out.transpose(1, 2) * weights).sum()
        grads.append((out, *torch.autograd.grad(loss, (q, k, v))))
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # The output comes in the same layout, so merging the heads back copies nothing.
    assert grads[0][0].transpose(1, 2).is_contiguous()
    strided = torch.randn(2, 4, 50, 32, device=DEVICE)[..., ::2]
    torch.testing.assert_close(
        sparsa.attention(strided, strided, strided, backend="triton"),
        sparsa.attention(strided, strided, strided, backend="reference"),
    )


def test_per_head_learnt_alpha_gets_its_gradient():
    q, k, v = _inputs(2, 4, 4, 50, 50, 16, torch.float32)
    alpha = torch.tensor([1.25, 1.5, 1.75, 2.0], device=DEVICE, requires_grad=True)
    _compare(
        q, k, v, torch.float32, alpha=alpha, is_causal=True, alibi_slopes=torch.full((4,), 0.1, device=DEVICE)
    )


@pytest.mark.parametrize("dim", [16, 64, 80, 128, 256])
def test_half_precision_and_head_dims(dim):
    q, k, v = _inputs(1, 2, 1, 45, 45, dim, torch.float16)
    _compare(q, k, v, torch.float16, alpha=1.5, is_causal=True)


@pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter has no correct bf16 products")
def test_bfloat16_on_gpu():
    q, k, v = _inputs(2, 4, 2, 300, 300, 64, torch.bfloat16)
    _compare(q, k, v, torch.bfloat16, alpha=1.5, is_causal=True)


def test_results_are_deterministic_and_stats_match_the_reference():
    q, k, v = _inputs(1, 2, 2, 40, 40, 16, torch.float32)
    first, stats = sparsa.attention(q, k, v, backend="triton", is_causal=True, return_stats=True)
    second = sparsa.attention(q, k, v, backend="triton", is_causal=True)
    assert torch.equal(first, second)
    _, ref = sparsa.attention(q, k, v, backend="reference", is_causal=True, return_stats=True)
    assert torch.equal(stats.support, ref.support)
    torch.testing.assert_close(stats.tau, ref.tau, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_tiles_of_zero_weights_are_skipped_and_the_results_stay_exact(alpha):
    """Each query points at one of the 16 keys before it (a local head): most key tiles hold no weight."""
    torch.manual_seed(0)
    n, dim = 200, 32
    k = torch.randn(1, 2, n, dim, device=DEVICE)
    targets = (torch.arange(n) - torch.randint(0, 16, (n,))).clamp(min=0)
    q = (3 * k[:, :, targets] + 0.3 * torch.randn(1, 2, n, dim, device=DEVICE)).requires_grad_()
    k.requires_grad_()
    v = torch.randn(1, 2, n, dim, device=DEVICE, requires_grad=True)
    padding = KeyPadding(torch.tensor([170], device=DEVICE), side="left")
    options = {"alpha": alpha, "is_causal": True, "attn_mask": padding}
    _compare(q, k, v, torch.float32, **options)
    out, stats = sparsa.attention(q, k, v, backend="triton", return_stats=True, **options)
    _, ref = sparsa.attention(q, k, v, backend="reference", return_stats=True, **options)
    assert torch.equal(stats.support, ref.support)
    # What the backward keeps of the tiles is one byte each (7 x 7 tiles per head), not the maxima.
    assert [t.dtype for t in out.grad_fn.saved_tensors if t.shape == (2, 7, 7)] == [torch.int8]
    # Skipping whole tiles above the diagonal alone would give 21 of 7 x 7 tiles, about 0.43 of the entries.
    assert stats.skipped_fraction > 0.55


def _check_threshold_passes(q, k, v, alpha, most_passes):
    out, stats = sparsa.attention(q, k, v, alpha=alpha, is_causal=True, backend="triton", return_stats=True)
    ref, ref_stats = sparsa.attention(
        q, k, v, alpha=alpha, is_causal=True, backend="reference", return_stats=True
    )
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(stats.tau, ref_stats.tau, atol=2e-6, rtol=1e-6)
    assert stats.threshold_passes.shape == (*q.shape[:2], -(-q.shape[2] // 32))
    assert int(stats.threshold_passes.max()) <= most_passes


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_tied_largest_scores_are_not_taken_for_one_dominant_key(alpha):
    """Each query's largest score comes twice: in head 0 from keys 2i and 2i + 1 (one tile), in head 1
    from keys j and j + 32 (two tiles). The first stream must see the tie: tau is not -1."""
    torch.manual_seed(0)
    n = 100
    k = torch.randn(1, 2, n, 32, device=DEVICE)
    k[:, 0, 1::2] = k[:, 0, 0::2]
    k[:, 1, 32:64] = k[:, 1, 0:32]
    targets = torch.randint(0, 32, (n,))
    q = (3 * k[:, :, targets] + 0.1 * torch.randn(1, 2, n, 32, device=DEVICE)).requires_grad_()
    k.requires_grad_()
    v = torch.randn(1, 2, n, 32, device=DEVICE, requires_grad=True)
    _compare(q, k, v, torch.float32, alpha=alpha)
    _, stats = sparsa.attention(q, k, v, alpha=alpha, backend="triton", return_stats=True)
    _, ref = sparsa.attention(q, k, v, alpha=alpha, backend="reference", return_stats=True)
    assert torch.equal(stats.support, ref.support)
    assert bool((ref.support == 2).all())
    torch.testing.assert_close(stats.tau, ref.tau, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize(("alpha", "most_passes"), [(1.5, 4), (1.75, 5)])
def test_gaussian_rows_find_tau_in_few_passes(alpha, most_passes):
    """Newton from tau = -1 alone takes 7 passes on these rows; the level bound and, for alpha <= 1.5,
    the stop on Newton's error bound cut that to 4-5 (the first pass included)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 256, 64, device=DEVICE) for _ in range(3))
    _check_threshold_passes(q, k, v, alpha, most_passes)


@pytest.mark.parametrize("alpha", [1.1, 1.5, 2.0])
@pytest.mark.parametrize("query_scale", [0.0, 1e-4, 100.0])
def test_tied_tiny_and_huge_scores(alpha, query_scale):
    """All scores tied (tau is then the bracket's right end, where rounding had sent Newton's step past
    it into many passes of bisection), nearly tied, and far apart: exact, in few passes."""
    torch.manual_seed(0)
    k = torch.randn(1, 2, 70, 16, device=DEVICE)
    q = query_scale * torch.randn(1, 2, 70, 16, device=DEVICE)
    _check_threshold_passes(q, k, torch.randn_like(k), alpha, 7)


@pytest.mark.parametrize("alpha", [1.25, 2.0])
def test_rows_with_one_dominant_key_need_no_threshold_pass(alpha):
    """Each query is close to one earlier key and far from the rest: tau = -1 follows from the two largest
    scores of the first pass, so the forward reads the keys twice (maximum, output)."""
    torch.manual_seed(0)
    k = torch.randn(1, 2, 256, 64, device=DEVICE)
    targets = torch.minimum(torch.randint(0, 256, (256,)), torch.arange(256))
    q = 3 * k[:, :, targets] + 0.5 * torch.randn(1, 2, 256, 64, device=DEVICE)
    _check_threshold_passes(q, k, torch.randn_like(k), alpha, 0)


@pytest.mark.parametrize("sizes", ["16x64x2", "64x16x4", "64x64x8"])
def test_other_tile_sizes_give_the_same_results(sizes):
    """The kernels are generic in their tile sizes, which the GPU benchmark sweeps."""
    torch.manual_seed(0)
    q, k, v = _inputs(2, 4, 2, 70, 100, 32, torch.float32)
    padding = KeyPadding(torch.tensor([100, 41], device=DEVICE), side="left")
    slopes = torch.tensor([0.5, 0.25, 0.0, 1.0], device=DEVICE)
    bias = ScoreBias(2, 4, 70, 100, is_causal=True, attn_mask=padding, alibi_slopes=slopes, device=DEVICE)
    alpha = torch.tensor([1.25, 1.5, 1.75, 2.0], device=DEVICE, requires_grad=True)
    out, stats = triton_attention(q, k, v, alpha, bias, 32**-0.5, True, TileSizes.parse(sizes))
    options = {"alpha": alpha, "is_causal": True, "attn_mask": padding, "alibi_slopes": slopes}
    ref, ref_stats = sparsa.attention(q, k, v, backend="reference", return_stats=True, **options)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert torch.equal(stats.support, ref_stats.support)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v, alpha), grad)
    expected = torch.autograd.grad(ref, (q, k, v, alpha), grad)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert stats.threshold_passes.shape == (2, 4, -(-70 // TileSizes.parse(sizes).block_m))


def test_tile_sizes_are_checked():
    assert str(TileSizes.parse("64x32x8")) == "64x32x8"
    with pytest.raises(ValueError, match="block_m must be a power of two of at least 16"):
        TileSizes(block_m=48)
    with pytest.raises(ValueError, match="num_warps"):
        TileSizes(num_warps=3)
    with pytest.raises(ValueError, match="BLOCK_MxBLOCK_NxWARPS"):
        TileSizes.parse("64x32")


@pytest.mark.skipif(DEVICE == "cuda", reason="a GPU runs the kernels themselves")
@pytest.mark.parametrize(
    "options",
    [["--dtype", "bf16", "--tile-sizes", "32x32x4"], ["--dtype", "fp16", "--tile-sizes", "64x64x8", "--full",
                                                      "--padding", "right"]],
)  # fmt: skip
def test_kernels_compile_for_gpus(options, tmp_path):
    """The interpreter runs the kernels' Python; `sparsa bench kernels` runs Triton's compiler down to
    Hopper machine code, which rejects what the interpreter lets through (in a process of its own: with
    TRITON_INTERPRET set, @triton.jit gives interpreter functions)."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "sparsa.cli", "bench", "kernels", "--dims", "64", "--out", str(tmp_path)]
    result = subprocess.run(command + options, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    assert [row["kernel"] for row in rows] == [
        "forward_kernel", "delta_kernel", "backward_query_kernel", "backward_key_kernel"
    ]  # fmt: skip
    assert all(0 < row["registers"] <= 255 for row in rows)
    assert "| 64 | " + options[3] + " | forward_kernel |" in result.stdout


def test_softmax_and_unsupported_inputs():
    q, k, v = _inputs(1, 2, 1, 20, 20, 16, torch.float32)
    torch.testing.assert_close(
        sparsa.attention(q, k, v, alpha=1.0, backend="triton", is_causal=True),
        sparsa.attention(q, k, v, alpha=1.0, backend="reference", is_causal=True),
    )
    with pytest.raises(ValueError, match="alpha in"):
        sparsa.attention(q, k, v, alpha=2.5, backend="triton")
    with pytest.raises(ValueError, match="alpha in"):
        sparsa.attention(q, k, v, alpha=torch.tensor([1.5, 2.5], device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="attn_mask tensor"):
        sparsa.attention(
            q, k, v, backend="triton", attn_mask=torch.ones(20, 20, dtype=torch.bool, device=DEVICE)
        )


@pytest.mark.parametrize(
    ("n_q", "n_k", "window", "padding"),
    [(100, 100, 7, "none"), (1, 130, 40, "left"), (40, 130, 64, "right"), (17, 17, 17, "left")],
)
def test_sliding_windows(n_q, n_k, window, padding):
    """Key tiles wholly before every row's window are never loaded; the rest match the reference."""
    q, k, v = _inputs(2, 4, 2, n_q, n_k, 16, torch.float32)
    mask = None if padding == "none" else KeyPadding(torch.tensor([n_k, n_k // 2], device=DEVICE), padding)
    _compare(q, k, v, torch.float32, alpha=1.5, is_causal=True, window=window, attn_mask=mask)
    _, stats = sparsa.attention(
        q, k, v, alpha=1.5, is_causal=True, window=window, attn_mask=mask, backend="triton", return_stats=True
    )
    assert bool((stats.support <= window).all())


@pytest.mark.parametrize(("n_q", "n_k", "softcap", "alibi"), [(70, 70, 0.5, True), (1, 130, 2.0, False)])
def test_soft_capped_scores(n_q, n_k, softcap, alibi):
    """The cap before the ALiBi bias, and its slope in both backward kernels."""
    q, k, v = _inputs(2, 4, 2, n_q, n_k, 16, torch.float32)
    slopes = torch.tensor([0.5, 0.1, 0.0, 0.0], device=DEVICE) if alibi else None
    _compare(q, k, v, torch.float32, alpha=1.5, is_causal=True, softcap=softcap, alibi_slopes=slopes)


@pytest.mark.parametrize(("n_q", "n_k", "padding"), [(70, 70, "none"), (1, 130, "left"), (40, 130, "right")])
def test_attention_sinks(n_q, n_k, padding):
    """Each head's sink joins the threshold, the normalisers and the backward; its gradient and a learnt
    alpha's match the reference."""
    q, k, v = _inputs(2, 4, 2, n_q, n_k, 16, torch.float32)
    mask = None if padding == "none" else KeyPadding(torch.tensor([n_k, n_k // 2], device=DEVICE), padding)
    sinks = torch.tensor([0.5, 3.0, -1.0, 1.5], device=DEVICE, requires_grad=True)
    alpha = torch.tensor([1.3, 1.5, 1.8, 2.0], device=DEVICE, requires_grad=True)
    options = dict(alpha=alpha, is_causal=True, attn_mask=mask, sinks=sinks, softcap=4.0)
    out = sparsa.attention(q, k, v, backend="triton", **options)
    ref = sparsa.attention(q, k, v, backend="reference", **options)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    grad = torch.randn_like(ref)
    for got, expected in zip(
        torch.autograd.grad(out, (q, k, v, sinks, alpha), grad),
        torch.autograd.grad(ref, (q, k, v, sinks, alpha), grad),
        strict=True,
    ):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_large_sink_takes_the_whole_row():
    q, k, v = _inputs(1, 4, 2, 17, 17, 16, torch.float32)
    out = sparsa.attention(q, k, v, alpha=1.5, sinks=torch.full((4,), 50.0, device=DEVICE), backend="triton")
    assert bool((out == 0).all())


@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_alibi_tiles_are_ruled_out_before_they_are_scored(alpha, padding):
    """Causal ALiBi heads: a key tile whose bound (|q| |k| plus its nearest key's bias) is at least
    1 / (alpha - 1) below a row's running maximum holds no weight and is never loaded. Head 0 is steep,
    head 1 has no slope (nothing ruled out), head 2's slope is negative (its largest bias is at the
    farthest key); a far key that head 0's query matches strongly must still be found."""
    torch.manual_seed(3)
    n, dim = 256, 16
    q, k, v = _inputs(1, 3, 3, n, n, dim, torch.float32)
    with torch.no_grad():
        k[0, 0, 5] = 250 * q[0, 0, 200] / q[0, 0, 200].norm()
    slopes = torch.tensor([1.0, 0.0, -0.05], device=DEVICE)
    mask = None if padding is None else KeyPadding(torch.tensor([230], device=DEVICE), side=padding)
    options = {"alpha": alpha, "is_causal": True, "alibi_slopes": slopes, "attn_mask": mask}
    _compare(q, k, v, torch.float32, **options)
    _, stats = sparsa.attention(q, k, v, backend="triton", return_stats=True, **options)
    _, ref = sparsa.attention(q, k, v, backend="reference", return_stats=True, **options)
    assert torch.equal(stats.support, ref.support)
    weights = sparsa.attention(
        q, k, torch.eye(n, device=DEVICE).expand(1, 3, n, n), backend="reference", **options
    )
    if padding != "left":
        assert float(weights[0, 0, 200, 5]) > 0  # the far key the bound had to leave open
    assert float(stats.unscored_key_blocks[0]) > 0.4
    assert float(stats.unscored_key_blocks[1]) == 0.0


def test_tiles_with_a_non_finite_key_are_scored():
    q, k, v = _inputs(1, 1, 1, 128, 128, 16, torch.float32)
    with torch.no_grad():
        k[0, 0, 3, 2] = float("nan")
    slopes = torch.tensor([1.0], device=DEVICE)
    out = sparsa.attention(q, k, v, alpha=1.5, is_causal=True, alibi_slopes=slopes, backend="triton")
    ref = sparsa.attention(q, k, v, alpha=1.5, is_causal=True, alibi_slopes=slopes, backend="reference")
    assert torch.equal(out.isnan(), ref.isnan()) and bool(out[0, 0, 3:].isnan().all())
