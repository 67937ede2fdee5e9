"""The related work's row maps: written-out references per row, gradients, edge cases, and attention."""

import importlib
import math

import pytest
import torch

import sparsa
from sparsa.attention import KeyPadding, weight_summary
from sparsa.normalize import ROW_MAPS, get_row_map
from sparsa.normalize.rowmaps import ADAPTIVE_TEMPERATURE_FIT, SOFTPICK_EPS

INF = math.inf
HEADS = 3


def _softmax(row):
    top = max(row)
    exps = [math.exp(z - top) for z in row]
    return [e / sum(exps) for e in exps]


def _by_row(reference):
    """A map written out one row at a time in plain Python: visible scores in, their weights out."""

    def apply(scores, head_values):
        out = torch.zeros_like(scores)
        for b, h, i in torch.cartesian_prod(*(torch.arange(n) for n in scores.shape[:3])).tolist():
            row = scores[b, h, i].tolist()
            keys = [j for j, z in enumerate(row) if z > -INF]
            if keys:
                weights = reference([row[j] for j in keys], {n: v[h] for n, v in head_values.items()})
                for j, w in zip(keys, weights, strict=True):
                    out[b, h, i, j] = w
        return out

    return apply


def _topk(row, values, k=3):
    kth = sorted(row, reverse=True)[min(k, len(row)) - 1]
    kept = [z if z >= kth else -INF for z in row]
    top = max(kept)
    exps = [math.exp(z - top) if z > -INF else 0.0 for z in kept]
    return [e / sum(exps) for e in exps]


def _stick(row, values):
    beta = [1 / (1 + math.exp(-z)) for z in row]
    return [beta[j] * math.prod(1 - b for b in beta[j + 1 :]) for j in range(len(row))]


def _adaptive(row, values):
    p = _softmax(row)
    entropy = -sum(w * math.log(w) for w in p if w > 0)
    fit = sum(c * entropy ** (4 - n) for n, c in enumerate(ADAPTIVE_TEMPERATURE_FIT))
    beta = max(1.0, fit) if entropy > 0.5 else 1.0
    return _softmax([beta * z for z in row])


def _elastic(row, values):
    return [max(0.0, w + values["tau"] / len(row)) for w in _softmax(row)]


def _nap(row, values):
    mean = sum(row) / len(row)
    std = math.sqrt(sum((z - mean) ** 2 for z in row) / len(row))
    return [values["gain"] * (z - mean) / (std + 1e-3) + values["bias"] for z in row]


def _alpha_relu(row, values, alpha=1.5, tau=0.0):
    return [max(0.0, (alpha - 1) * z - tau) ** (1 / (alpha - 1)) for z in row]


def _sigmoid(row, values):
    return [1 / (1 + math.exp(-(z - math.log(len(row))))) for z in row]


def _softpick(row, values):
    shifted = [math.exp(z) - 1 for z in row]
    return [max(0.0, s) / (sum(abs(t) for t in shifted) + SOFTPICK_EPS) for s in shifted]


REFERENCES = {
    "topk-softmax": (_topk, {"k": 3}),
    "stick-breaking": (_stick, {}),
    "adaptive-temperature": (_adaptive, {}),
    "elastic-softmax": (_elastic, {}),
    "nap": (_nap, {}),
    "alpha-relu": (_alpha_relu, {}),
    "sigmoid": (_sigmoid, {}),
    "softpick": (_softpick, {}),
}


def _parameters(name, dtype=torch.float64):
    generator = torch.Generator().manual_seed(3)
    return {
        n: start + 0.3 * torch.randn(HEADS, generator=generator, dtype=dtype)
        for n, start in get_row_map(name).parameters.items()
    }


def _masked_scores(dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    scores = 2 * torch.randn(2, HEADS, 5, 9, generator=generator, dtype=dtype)
    hidden = torch.rand(scores.shape, generator=generator) < 0.3
    hidden[0, 0, 1] = True
    hidden[1, 2, 3, :-1] = True
    return scores.masked_fill(hidden, -INF)


def test_every_row_map_has_a_reference():
    assert set(ROW_MAPS) == set(REFERENCES)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_row_maps_equal_their_written_out_reference_on_masked_rows(name):
    reference, options = REFERENCES[name]
    scores = _masked_scores()
    parameters = _parameters(name)
    expected = _by_row(reference)(scores, {n: v.tolist() for n, v in parameters.items()})
    weights = get_row_map(name)(scores, parameters, **options)
    torch.testing.assert_close(weights, expected, atol=1e-12, rtol=1e-10)
    assert torch.equal(weights[0, 0, 1], torch.zeros(9, dtype=torch.float64))
    assert bool((weights[scores == -INF] == 0).all())


@pytest.mark.parametrize("name", list(REFERENCES))
def test_row_maps_have_exact_gradients_in_fp64(name):
    options = REFERENCES[name][1]
    scores = _masked_scores()[:1, :, :3, :6]
    hidden = scores == -INF
    finite = torch.where(hidden, torch.randn_like(scores), scores).requires_grad_()
    parameters = {n: v.requires_grad_() for n, v in _parameters(name).items()}
    names = list(parameters)

    def weights(x, *values):
        return get_row_map(name)(
            x.masked_fill(hidden, -INF), dict(zip(names, values, strict=True)), **options
        )

    assert torch.autograd.gradcheck(weights, (finite, *parameters.values()))


@pytest.mark.parametrize("name", list(REFERENCES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_maps_stay_finite_on_huge_tiny_and_single_key_rows(name, dtype):
    options = REFERENCES[name][1]
    rows = torch.tensor(
        [[1e4, -1e4, 0.0, 3.0], [1e-8, -1e-8, 2e-8, 0.0], [-1e4, -2e4, -3e4, -5e3]], dtype=dtype
    )
    scores = rows.expand(1, HEADS, 3, 4).clone()
    single = torch.full((1, HEADS, 1, 4), -INF, dtype=dtype)
    single[..., 2] = 0.7
    for x in (scores, single):
        x.requires_grad_()
        weights = get_row_map(name)(x, _parameters(name, dtype), **options)
        assert bool(torch.isfinite(weights).all()), weights
        weights.sum().backward()
        assert bool(torch.isfinite(x.grad).all())
    normalized = get_row_map(name).normalized
    if normalized:
        torch.testing.assert_close(weights.detach().sum(-1), torch.ones(1, HEADS, 1, dtype=dtype))


def test_topk_keeps_k_keys_clamped_to_the_visible_ones():
    scores = torch.tensor([[[[3.0, 1.0, 2.0, 0.0, -INF]]]])
    assert int((get_row_map("topk-softmax")(scores.expand(1, 1, 1, 5), k=2) > 0).sum()) == 2
    assert int((get_row_map("topk-softmax")(scores, k=10) > 0).sum()) == 4


def test_stick_breaking_gives_the_nearest_key_first_claim_and_drops_the_rest():
    scores = torch.zeros(1, 1, 1, 3, dtype=torch.float64)
    torch.testing.assert_close(
        get_row_map("stick-breaking")(scores)[0, 0, 0], torch.tensor([0.125, 0.25, 0.5], dtype=torch.float64)
    )


def test_stick_breaking_without_the_current_token_breaks_the_stick_over_the_earlier_keys():
    scores = _masked_scores()
    weights = get_row_map("stick-breaking")(scores, current=0)
    expected = _by_row(lambda row, values: [*_stick(row[:-1], values), 0.0])(scores, {})
    torch.testing.assert_close(weights, expected)
    one_key = torch.tensor([[[[0.5, -INF]]]], dtype=torch.float64)
    assert get_row_map("stick-breaking")(one_key, current=0).abs().sum() == 0
    with pytest.raises(ValueError, match=r"option current must be 0 or 1, got 0\.5"):
        get_row_map("stick-breaking")(scores, current=0.5)


def test_bad_row_map_arguments_are_named():
    scores = torch.zeros(1, HEADS, 2, 2)
    with pytest.raises(ValueError, match="unknown row map 'nosuch'"):
        get_row_map("nosuch")
    with pytest.raises(ValueError, match="takes options"):
        get_row_map("sigmoid")(scores, k=3)
    with pytest.raises(ValueError, match=r"must have shape \(3,\)"):
        get_row_map("elastic-softmax")(scores, {"tau": torch.zeros(2)})
    with pytest.raises(ValueError, match="takes parameters"):
        get_row_map("nap")(scores, {"gain": torch.ones(HEADS)})


def _qkv(dtype=torch.float64, n_q=21, n_k=21, kv_heads=1, seed=1):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, HEADS, n_q, 8, generator=generator, dtype=dtype)
    k = torch.randn(2, kv_heads, n_k, 8, generator=generator, dtype=dtype)
    v = torch.randn(2, kv_heads, n_k, 8, generator=generator, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("name", list(REFERENCES))
def test_blocked_row_map_attention_equals_the_reference_with_gradients(name, monkeypatch):
    blocked = importlib.import_module("sparsa.attention.blocked")
    monkeypatch.setattr(blocked, "MIN_QUERY_BLOCK", 4)
    monkeypatch.setattr(blocked, "SCORE_BLOCK_BUDGET", 2 * HEADS * 4 * 30)
    q, k, v = (x.requires_grad_() for x in _qkv())
    parameters = {n: p.requires_grad_() for n, p in _parameters(name).items()}
    padding = KeyPadding(torch.tensor([21, 17]), "left")
    options = {
        "is_causal": True,
        "attn_mask": padding,
        "alibi_slopes": torch.tensor([0.0, 0.5, 0.25], dtype=torch.float64),
        "row_map": name,
        "row_parameters": parameters,
        "row_options": REFERENCES[name][1],
    }
    results = []
    for backend in ("reference", "blocked"):
        out = sparsa.attention(q, k, v, backend=backend, **options)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v, *parameters.values()))
        results.append((out, grads))
    (out_ref, grads_ref), (out_blocked, grads_blocked) = results
    torch.testing.assert_close(out_blocked, out_ref, atol=1e-12, rtol=1e-10)
    for ours, theirs in zip(grads_blocked, grads_ref, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-8)


def test_row_map_attention_of_one_query_equals_the_last_row_of_the_full_one():
    q, k, v = _qkv()
    for name, options in (
        ("stick-breaking", {}),
        ("stick-breaking", {"current": 0}),
        ("sigmoid", {}),
        ("elastic-softmax", {}),
    ):
        for backend in ("reference", "blocked"):
            run = {"is_causal": True, "row_map": name, "row_options": options, "backend": backend}
            full = sparsa.attention(q, k, v, **run)
            last = sparsa.attention(q[:, :, -1:], k, v, **run)
            torch.testing.assert_close(last, full[:, :, -1:], atol=1e-12, rtol=0)
    without_current = sparsa.attention(
        q, k, v, is_causal=True, row_map="stick-breaking", row_options={"current": 0}
    )
    assert without_current[:, :, 0].abs().sum() == 0


def test_row_map_attention_refuses_what_it_cannot_compute():
    q, k, v = _qkv(torch.float32)
    with pytest.raises(ValueError, match="needs is_causal=True"):
        sparsa.attention(q, k, v, row_map="stick-breaking")
    with pytest.raises(ValueError, match="backend 'triton' computes alpha-entmax only"):
        sparsa.attention(q, k, v, row_map="sigmoid", backend="triton")
    with pytest.raises(ValueError, match="has none"):
        sparsa.attention(q, k, v, row_map="sigmoid", return_stats=True)
    with pytest.raises(ValueError, match="unknown row map"):
        sparsa.attention(q, k, v, row_map="nosuch")


def test_weight_summary_of_a_row_map_describes_its_weight_magnitudes():
    q, k, _ = _qkv()
    summary = weight_summary(q, k, is_causal=True, row_map="nap")
    scores = (q @ k.transpose(-1, -2)).div(math.sqrt(8)).masked_fill(torch.ones(21, 21).triu(1).bool(), -INF)
    weights = get_row_map("nap")(scores).abs()
    torch.testing.assert_close(summary.max_weight, weights.amax(-1).mean((0, 2)).float())
    torch.testing.assert_close(summary.support, (weights > 0).sum(-1).double().mean((0, 2)).float())


@pytest.mark.parametrize("name", ["stick-breaking", "nap", "topk-softmax"])
def test_blocked_row_map_attention_passes_gradcheck_in_fp64(name, monkeypatch):
    blocked = importlib.import_module("sparsa.attention.blocked")
    monkeypatch.setattr(blocked, "MIN_QUERY_BLOCK", 2)
    monkeypatch.setattr(blocked, "SCORE_BLOCK_BUDGET", 1)
    q, k, v = (x[:1, :, :5].clone().requires_grad_() for x in _qkv(n_q=5, n_k=5))
    parameters = {n: p.requires_grad_() for n, p in _parameters(name).items()}
    names = list(parameters)

    def attend(q, k, v, *values):
        options = {
            "row_parameters": dict(zip(names, values, strict=True)),
            "row_options": REFERENCES[name][1],
        }
        return sparsa.attention(q, k, v, is_causal=True, row_map=name, backend="blocked", **options)

    assert torch.autograd.gradcheck(attend, (q, k, v, *parameters.values()))
