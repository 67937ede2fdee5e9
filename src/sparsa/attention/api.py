"""sparsa.attention: q, k, v -> output, one function over every backend."""

from __future__ import annotations

import functools
import importlib.util
import math
from numbers import Integral, Real

import torch
from torch import Tensor

from ..normalize._validate import compute_dtype
from ..normalize.rowmaps import get_row_map
from .blocked import blocked_attention, blocked_row_map_attention
from .masks import KeyPadding, ScoreBias
from .reference import reference_attention, reference_row_map_attention, reference_weights
from .stats import AttentionStats


def _triton_attention(q, k, v, alpha, bias, scale, stats, sinks):
    from .triton import triton_attention

    return triton_attention(q, k, v, alpha, bias, scale, stats, sinks=sinks)


BACKENDS = {"reference": reference_attention, "blocked": blocked_attention, "triton": _triton_attention}


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    alpha: float | Tensor = 1.5,
    is_causal: bool = False,
    window: int | None = None,
    attn_mask: Tensor | KeyPadding | None = None,
    scale: float | None = None,
    alibi_slopes: Tensor | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
    backend: str = "auto",
    return_stats: bool = False,
    dropout_p: float = 0.0,
    row_map: str | None = None,
    row_parameters: dict[str, Tensor] | None = None,
    row_options: dict[str, float] | None = None,
) -> Tensor | tuple[Tensor, AttentionStats]:
    """alpha-entmax attention: entmax_alpha(scale * q k^T + bias) v.

    Args:
        q: queries (B, H, Nq, D).
        k: keys (B, Hkv, Nk, D), H divisible by Hkv (grouped-query attention;
            K and V are never repeated).
        v: values (B, Hkv, Nk, Dv).
        alpha: >= 1; a float (1.0 is softmax, 1.5 the usual sparse choice) or
            a tensor (H,) with one alpha per head, whose gradient is computed.
        is_causal: each query sees keys up to its position; with Nq <= Nk
            query i sits at position Nk - Nq + i (chunked prefill, decoding).
        window: with ``is_causal``, each query sees at most its ``window`` most
            recent keys, itself included (a sliding window, as in Mistral and
            Gemma); key blocks wholly outside every row's window are never
            scored, so the cost is O(N window). A window at least Nk long is
            plain causal attention.
        attn_mask: bool (True = keep) or float (added to the scores) tensor
            broadcastable to (B, H, Nq, Nk), or a :class:`KeyPadding` of
            per-batch key counts (left or right padding) without a mask tensor.
        scale: multiplies q k^T; default 1/sqrt(D).
        alibi_slopes: (H,) or (B, H); adds slope * (key_pos - query_pos).
        softcap: a soft cap c > 0 on the content scores: s = scale q.k becomes
            c tanh(s / c) before biases and masks are added (Gemma 2's
            ``attn_logit_softcapping``).
        sinks: (H,) one learnt logit per head that joins every row as a score
            with no value (GPT-OSS's attention sinks): it takes part in the
            normalizer, so it takes weight from the keys, and under entmax a
            row may give every key zero weight. Its gradient is computed.
        backend: "reference" (dense, the ground truth), "blocked"
            (memory-efficient, O(N) extra memory per head), "triton" (fused
            kernels: CUDA, or Triton's interpreter on CPU; alpha in (1, 2],
            alpha = 1 runs the blocked softmax path; no attn_mask tensor) or
            "auto" (triton on CUDA where it applies, blocked elsewhere).
        return_stats: also return :class:`AttentionStats` (per-row tau and
            support size, skipped fraction).
        dropout_p: attention dropout (weights zeroed with this probability,
            the rest scaled by 1 / (1 - dropout_p)), for training; it needs
            the weight matrix, so any dropout_p > 0 runs the dense
            "reference" backend whatever ``backend`` says.
        row_map: instead of alpha-entmax, a row map of the related work by
            name (:data:`sparsa.normalize.ROW_MAPS`: top-k softmax,
            stick-breaking, adaptive temperature, ...), with its per-head
            ``row_parameters`` (tensors (H,), learnt by the caller; default
            their start values) and fixed ``row_options``. Runs in the
            "reference" and "blocked" backends ("auto" picks blocked); no
            ``return_stats`` (row maps have no entmax threshold) and no sinks.

    Rows with no visible key give zeros and zero gradients. Non-finite inputs
    behave as in torch, in every backend: a NaN score (from q, k, a float
    mask or a bias) or a +inf score makes its row NaN, forward and backward;
    -inf hides a key; a NaN value makes NaN at least every row that gives
    its key weight (docs/design.md).

    Example:
        >>> import torch, sparsa
        >>> q, k, v = torch.randn(1, 4, 128, 32), torch.randn(1, 2, 128, 32), torch.randn(1, 2, 128, 32)
        >>> out = sparsa.attention(q, k, v, alpha=1.5, is_causal=True)  # 4 query heads share 2 KV heads
        >>> out.shape
        torch.Size([1, 4, 128, 32])
        >>> reference = sparsa.attention(q, k, v, alpha=1.5, is_causal=True, backend="reference")
        >>> torch.allclose(out, reference, atol=1e-5)
        True
    """
    _check_qkv(q, k, v)
    alpha, scale, bias = _scores_setup(
        q, k, alpha, is_causal, window, attn_mask, scale, alibi_slopes, softcap, sinks
    )
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(f"backend must be one of {(*BACKENDS, 'auto')}, got {backend!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, Real) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if row_map is not None:
        if sinks is not None:
            raise ValueError(f"sinks join entmax thresholds; row map {row_map!r} takes none")
        return _row_map_attention(
            q,
            k,
            v,
            row_map,
            row_parameters,
            row_options,
            bias,
            scale,
            backend,
            return_stats,
            float(dropout_p),
        )
    if dropout_p > 0:
        out, stats = reference_attention(
            q, k, v, alpha, bias, scale, return_stats, float(dropout_p), sinks=sinks
        )
        return (out, stats) if return_stats else out
    if backend == "auto":
        backend = "triton" if _triton_applies(q, alpha, attn_mask) else "blocked"
    elif backend == "triton":
        _check_triton(alpha, attn_mask)
        if isinstance(alpha, float) and alpha == 1.0:
            backend = "blocked"
    run = BACKENDS[backend]
    out, stats = run(q, k, v, alpha, bias, scale, return_stats, sinks=sinks)
    return (out, stats) if return_stats else out


def attention_weights(
    q: Tensor,
    k: Tensor,
    *,
    alpha: float | Tensor = 1.5,
    is_causal: bool = False,
    window: int | None = None,
    attn_mask: Tensor | KeyPadding | None = None,
    scale: float | None = None,
    alibi_slopes: Tensor | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """The alpha-entmax weights (B, H, Nq, Nk) that :func:`attention` gives its values, computed densely.

    Arguments mean what they mean for :func:`attention` (a sink's own weight
    is left out, so rows sum to less than 1 where it takes some). This holds
    B H Nq Nk numbers at once: for inspecting sparsity, not for long
    sequences. Differentiable.
    """
    _check_qkv(q, k, k)
    alpha, scale, bias = _scores_setup(
        q, k, alpha, is_causal, window, attn_mask, scale, alibi_slopes, softcap, sinks
    )
    _, weights = reference_weights(q, k, alpha, bias, scale, sinks)
    return weights[..., : k.shape[2]]


def _scores_setup(q, k, alpha, is_causal, window, attn_mask, scale, alibi_slopes, softcap, sinks):
    """The checked alpha and scale, and the :class:`ScoreBias`, that every entry point starts from."""
    batch, heads, n_q, dim = q.shape
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if is_causal and n_q > k.shape[2]:
        raise ValueError(
            f"is_causal needs Nq <= Nk (queries aligned to the end of the keys), got {n_q} > {k.shape[2]}"
        )
    _check_window(window, is_causal)
    _check_softcap(softcap)
    _check_sinks(sinks, heads, q.device)
    alpha = _check_alpha(alpha, heads, q.device)
    scale = 1 / math.sqrt(dim) if scale is None else _check_scale(scale)
    if alibi_slopes is not None and alibi_slopes.device != q.device:
        raise ValueError(f"alibi_slopes is on {alibi_slopes.device}, q on {q.device}")
    if isinstance(attn_mask, Tensor) and attn_mask.device != q.device:
        raise ValueError(f"attn_mask is on {attn_mask.device}, q on {q.device}")
    bias = ScoreBias(
        batch,
        heads,
        n_q,
        k.shape[2],
        is_causal=is_causal,
        attn_mask=attn_mask,
        alibi_slopes=alibi_slopes,
        device=q.device,
        window=None if window is None else int(window),
        softcap=None if softcap is None else float(softcap),
    )
    return alpha, scale, bias


def _row_map_attention(q, k, v, name, parameters, options, bias, scale, backend, return_stats, dropout_p):
    chosen = get_row_map(name)
    if backend == "triton":
        raise ValueError(
            f"backend 'triton' computes alpha-entmax only; row map {name!r} needs 'blocked' or 'reference'"
        )
    if return_stats:
        raise ValueError(f"return_stats describes entmax thresholds; row map {name!r} has none")
    if chosen.causal and not bias.is_causal:
        raise ValueError(f"row map {name!r} reads keys in causal order and needs is_causal=True")
    arguments = chosen.arguments(
        q.shape[1], parameters, options or {}, q.new_empty(0, dtype=compute_dtype(q.dtype))
    )
    tensors = {n: value for n, value in arguments.items() if isinstance(value, Tensor)}
    for n, value in tensors.items():
        if value.device != q.device:
            raise ValueError(f"row parameter {n!r} is on {value.device}, q on {q.device}")
    fixed = {n: value for n, value in arguments.items() if n not in tensors}
    if dropout_p > 0 or backend == "reference":
        weigh = functools.partial(chosen.weigh, **tensors, **fixed)
        return reference_row_map_attention(q, k, v, weigh, bias, scale, dropout_p)
    return blocked_row_map_attention(q, k, v, chosen.weigh, tensors, fixed, bias, scale)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, heads, length, head_dim), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(
            f"q, k and v must share the batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}"
        )
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must share heads and length, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"heads of q ({q.shape[1]}) must be a multiple of heads of k and v ({k.shape[1]})")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must share head_dim, got {q.shape[3]} and {k.shape[3]}")


def _check_window(window: int | None, is_causal: bool) -> None:
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, Integral) or window < 1:
        raise ValueError(f"window must be a positive integer or None, got {window!r}")
    if not is_causal:
        raise ValueError("window needs is_causal=True: a sliding window holds the most recent keys")


def _check_softcap(softcap: float | None) -> None:
    if softcap is None:
        return
    if (
        isinstance(softcap, bool)
        or not isinstance(softcap, Real)
        or not math.isfinite(softcap)
        or softcap <= 0
    ):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")


def _check_sinks(sinks: Tensor | None, heads: int, device: torch.device) -> None:
    if sinks is None:
        return
    if not isinstance(sinks, Tensor) or not sinks.is_floating_point():
        raise TypeError(f"sinks must be a floating-point tensor ({heads},) or None")
    if sinks.shape != (heads,):
        raise ValueError(f"sinks must have shape ({heads},) (one logit per head), got {tuple(sinks.shape)}")
    if sinks.device != device:
        raise ValueError(f"sinks is on {sinks.device}, q on {device}")


def _check_alpha(alpha: float | Tensor, heads: int, device: torch.device) -> float | Tensor:
    if isinstance(alpha, Tensor):
        if not alpha.is_floating_point():
            raise TypeError(f"alpha must be a float or a floating-point tensor (H,), got {alpha.dtype}")
        if alpha.shape != (heads,):
            raise ValueError(
                f"alpha as a tensor must have shape ({heads},) (one per head), got {tuple(alpha.shape)}"
            )
        if alpha.device != device:
            raise ValueError(f"alpha is on {alpha.device}, q on {device}")
        values = alpha.detach()
        if bool((torch.isnan(values) | torch.isinf(values) | (values < 1)).any()):
            raise ValueError("alpha must be finite and >= 1 for every head")
        return alpha
    if isinstance(alpha, bool) or not isinstance(alpha, Real):
        raise TypeError(f"alpha must be a float or a tensor (H,), got {type(alpha).__name__}")
    if math.isnan(alpha) or math.isinf(alpha) or alpha < 1:
        raise ValueError(f"alpha must be finite and >= 1, got {alpha}")
    return float(alpha)


def _check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    return float(scale)


def _triton_applies(q: Tensor, alpha: float | Tensor, attn_mask) -> bool:
    if not q.is_cuda or isinstance(attn_mask, Tensor) or not _is_sparse_alpha(alpha):
        return False
    return importlib.util.find_spec("triton") is not None


def _is_sparse_alpha(alpha: float | Tensor) -> bool:
    """alpha in (1, 2] for every head: what the Triton kernels compute."""
    values = alpha.detach() if isinstance(alpha, Tensor) else torch.tensor(alpha)
    return bool(((values > 1) & (values <= 2)).all())


def _check_triton(alpha: float | Tensor, attn_mask) -> None:
    if importlib.util.find_spec("triton") is None:
        raise ValueError("backend 'triton' needs the triton package: pip install 'sparsa[triton]'")
    if isinstance(attn_mask, Tensor):
        raise ValueError(
            "backend 'triton' takes is_causal, KeyPadding and ALiBi; an attn_mask tensor needs 'blocked'"
        )
    if not (_is_sparse_alpha(alpha) or (isinstance(alpha, float) and alpha == 1.0)):
        raise ValueError(
            "backend 'triton' takes alpha in (1, 2] (or the float 1.0); use 'blocked' for other alpha"
        )
