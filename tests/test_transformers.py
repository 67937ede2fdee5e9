"""Hugging Face integration: converted tiny Llama and Qwen2 models against attention written out by hand."""

import copy
import importlib
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from transformers.masking_utils import AttentionMaskInterface, eager_mask  # noqa: E402
from transformers.modeling_utils import AttentionInterface  # noqa: E402

import sparsa  # noqa: E402
from sparsa.attention import DecodeStats, KeyPadding  # noqa: E402
from sparsa.cli import main  # noqa: E402
from sparsa.integrations.transformers import (  # noqa: E402
    PagedCache,
    attention_modules,
    from_pretrained,
    sparsa_attention,
    sparsify,
)

VOCAB = 61
CACHE_ARGUMENT = (
    "cache" if "cache" in getattr(transformers.generation.utils, "ALL_CACHE_NAMES", ()) else "past_key_values"
)
"""The name generate and forward give a cache the caller passes (past_key_values before transformers 5.x)."""
HAND = "sparsa-by-hand"


def _tiny(family: str, **overrides):
    common = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        **overrides,
    }
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif family == "mistral":  # its config carries sliding_window=4096, longer than any test's keys
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    elif family == "gpt_neox":  # its attention module has head_size, not head_dim, and fused QKV
        common.pop("num_key_value_heads")
        model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    return model.eval()


def _perturb_sparsa_parameters(model, size=0.5):
    """Move the sparsa parameters off their near-identity start so the scaling formula matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".sparsa." in name:
                p.add_(size * torch.randn_like(p))


def _record_inputs(model):
    """Each attention module's input, kept by hooks of the test's own."""
    for module in attention_modules(model):
        module.register_forward_pre_hook(
            lambda m, args, kwargs: setattr(m, "test_input", args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )


def _scale_by_hand(module, visible):
    """delta + beta (log(n+1))^gamma, s log(n+1) or the inverse temperature, per formula; (B, H, N)."""
    controls, x = module.sparsa, module.test_input.double()
    log_n = torch.log1p(visible.clamp(min=1).double())[:, None, :]
    scaling, heads = controls.scaling, controls.scaled_heads
    if scaling is None:
        return None
    if isinstance(scaling, sparsa.layers.ASEntmaxScale):
        beta = F.softplus(x @ scaling.beta.weight.double().T + scaling.beta.bias.double()).transpose(1, 2)
        gamma = 2 * torch.tanh(x @ scaling.gamma.weight.double().T + scaling.gamma.bias.double()).transpose(
            1, 2
        )
        scaled = 1 + beta * log_n**gamma
    elif isinstance(scaling, sparsa.layers.SSMaxScale):
        scaled = scaling.s.double()[None, :, None] * log_n
    else:
        raise AssertionError(f"no formula for {type(scaling).__name__}")
    full = torch.ones(x.shape[0], controls.n_heads, x.shape[1], dtype=torch.float64)
    full[:, heads] = scaled.expand(x.shape[0], -1, -1)
    return full


def _attention_by_hand(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """alpha-entmax attention over the additive mask transformers' eager path builds, in fp64."""
    q, k, v = query.double(), key.double(), value.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    n_q, n_k = q.shape[2], k.shape[2]
    if attention_mask is None:
        allowed = torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q)[None, None]
    else:
        allowed = attention_mask[..., :n_k] == 0
    visible = allowed[:, 0].sum(-1).expand(q.shape[0], n_q)
    scale = _scale_by_hand(module, visible)
    if scale is not None:
        q = q * scale[..., None]
    scores = (q @ k.transpose(-1, -2) * scaling).masked_fill(~allowed, -math.inf)
    alpha = module.sparsa.alpha
    alpha = alpha if isinstance(alpha, float) else alpha.double().view(1, -1, 1, 1)
    weights = sparsa.entmax(scores, alpha, dim=-1).nan_to_num(0.0)
    out = (weights @ v).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(HAND, _attention_by_hand)
AttentionMaskInterface.register(HAND, eager_mask)


def _use(model, implementation):
    model.set_attn_implementation(implementation)
    return model


def _left_padded_batch(batch=3, length=13):
    ids = torch.randint(4, VOCAB, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :5] = 0
    mask[2, :2] = 0
    return ids, mask


def _real_rows(logits, mask):
    return logits[mask.bool()]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("scaling", [None, "ssmax", "asentmax"])
def test_converted_model_equals_attention_by_hand(family, alpha, scaling):
    torch.manual_seed(0)
    model = sparsify(_tiny(family), alpha, scaling=scaling, heads=[0, 2, 3] if scaling else "all")
    _perturb_sparsa_parameters(model)
    _record_inputs(model)
    ids, mask = _left_padded_batch()
    for attention_mask in (None, mask):
        with torch.no_grad():
            ours = _use(model, "sparsa")(ids, attention_mask=attention_mask).logits
            by_hand = _use(model, HAND)(ids, attention_mask=attention_mask).logits
        if attention_mask is not None:
            ours, by_hand = _real_rows(ours, mask), _real_rows(by_hand, mask)
        torch.testing.assert_close(ours, by_hand, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_reach_attention_as_key_padding(side, monkeypatch):
    """The fused kernels take no mask tensor: transformers' padded causal masks are passed as lengths."""
    integration = importlib.import_module("sparsa.integrations.transformers")
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["attn_mask"])
        return sparsa.attention(*args, **kwargs)

    monkeypatch.setattr(integration, "attention", spy)
    model = sparsify(_tiny("llama"), 1.5)
    ids, mask = _left_padded_batch()
    if side == "right":
        mask = mask.flip(-1)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert seen and all(isinstance(m, KeyPadding) and m.side == side for m in seen)
    torch.testing.assert_close(seen[0].lengths, mask.sum(-1))


def test_learnt_alpha_equals_attention_by_hand_and_gets_gradients():
    torch.manual_seed(1)
    model = sparsify(_tiny("llama"), 1.5, scaling="asentmax", learn_alpha=True)
    _perturb_sparsa_parameters(model)
    _record_inputs(model)
    ids, mask = _left_padded_batch()
    ours = _use(model, "sparsa")(ids, attention_mask=mask).logits
    with torch.no_grad():
        by_hand = _use(model, HAND)(ids, attention_mask=mask).logits
    torch.testing.assert_close(_real_rows(ours, mask), _real_rows(by_hand, mask), atol=1e-5, rtol=1e-5)
    _real_rows(ours, mask).square().mean().backward()
    for name, p in model.named_parameters():
        if ".sparsa." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt_neox"])
def test_alpha_one_without_scaling_equals_the_original_model(family):
    torch.manual_seed(2)
    model = _tiny(family)
    ids, mask = _left_padded_batch()
    with torch.no_grad():
        original = [model(ids).logits, model(ids, attention_mask=mask).logits]
        sparsify(model, 1.0)
        converted = [model(ids).logits, model(ids, attention_mask=mask).logits]
    torch.testing.assert_close(converted[0], original[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        _real_rows(converted[1], mask), _real_rows(original[1], mask), atol=1e-5, rtol=1e-5
    )


def _greedy_by_full_forwards(model, ids, mask, steps):
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt_neox"])
@pytest.mark.parametrize("padded", [False, True])
def test_generate_with_the_cache_equals_greedy_full_forwards(family, padded):
    torch.manual_seed(3)
    model = sparsify(_tiny(family), 1.5, scaling="asentmax")
    _perturb_sparsa_parameters(model)
    ids, mask = _left_padded_batch()
    if not padded:
        mask = torch.ones_like(mask)
    generated = model.generate(
        ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    torch.testing.assert_close(generated, _greedy_by_full_forwards(model, ids, mask, 8))


def test_static_cache_generates_what_the_dynamic_cache_does():
    torch.manual_seed(7)
    model = sparsify(_tiny("llama"), 1.5, scaling="ssmax")
    _perturb_sparsa_parameters(model)
    ids, mask = _left_padded_batch()
    for attention_mask in (torch.ones_like(mask), mask):
        options = {
            "attention_mask": attention_mask,
            "max_new_tokens": 6,
            "do_sample": False,
            "pad_token_id": 0,
        }
        dynamic = model.generate(ids, **options)
        torch.testing.assert_close(model.generate(ids, cache_implementation="static", **options), dynamic)


@pytest.fixture
def plan_every_length(monkeypatch):
    """Make decode plan with its page bounds on these short caches instead of going dense."""
    paged = importlib.import_module("sparsa.attention.paged")
    monkeypatch.setattr(paged.decode, "__kwdefaults__", {**paged.decode.__kwdefaults__, "dense_below": 0})


def _generate(model, ids, mask, steps, cache=None):
    options = {} if cache is None else {CACHE_ARGUMENT: cache}
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0, eos_token_id=None,
        output_scores=True, return_dict_in_generate=True, **options,
    )  # fmt: skip
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize(
    "conversion",
    [{"alpha": 1.5, "scaling": "asentmax"}, {"alpha": 2.0}, {"alpha": 1.25, "learn_alpha": True}],
    ids=["asentmax", "sparsemax", "learnt-alpha"],
)
def test_the_paged_cache_generates_what_the_dense_cache_does(family, padding, conversion, plan_every_length):
    torch.manual_seed(8)
    model = sparsify(_tiny(family), **conversion)
    _perturb_sparsa_parameters(model)
    ids, mask = _left_padded_batch(length=23)
    if padding == "none":
        mask = torch.ones_like(mask)
    elif padding == "right":
        mask = mask.flip(-1)
    dense, dense_scores = _generate(model, ids, mask, 10)
    cache = PagedCache(model, page_size=3, keep_stats=True)
    paged, paged_scores = _generate(model, ids, mask, 10, cache)
    torch.testing.assert_close(paged, dense)
    torch.testing.assert_close(paged_scores, dense_scores, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == ids.shape[1] + 9
    real = mask.sum(-1) + 9
    for stats, layer in zip(cache.stats, cache.layers, strict=True):
        assert isinstance(stats, DecodeStats)
        torch.testing.assert_close(layer.pages.lengths, real)
        assert bool((stats.pages_read <= stats.pages_visible).all())


def test_the_paged_cache_skips_pages_of_a_sparse_model(plan_every_length):
    """Sharp sparsemax heads (large query and key weights, slow RoPE) over a 600-token prompt."""
    torch.manual_seed(1)
    model = sparsify(_tiny("llama", rope_theta=1e6, max_position_embeddings=1024), 2.0)
    with torch.no_grad():
        for module in attention_modules(model):
            module.q_proj.weight.mul_(30.0)
            module.k_proj.weight.mul_(3.0)
    ids = torch.randint(4, VOCAB, (2, 600))
    cache = PagedCache(model, page_size=8, keep_stats=True)
    dense, _ = _generate(model, ids, None, 2)
    paged, _ = _generate(model, ids, None, 2, cache)
    torch.testing.assert_close(paged, dense)
    read = sum(int(s.pages_read.sum()) for s in cache.stats)
    visible = sum(int(s.pages_visible.sum()) for s in cache.stats)
    assert read < 0.25 * visible


def test_the_paged_cache_refuses_what_it_cannot_decode():
    model = sparsify(_tiny("llama"), 1.5)
    ids, mask = _left_padded_batch()
    with pytest.raises(ValueError, match="sparsify"):
        PagedCache(_tiny("llama"))
    with pytest.raises(ValueError, match="page_size"):
        PagedCache(model, page_size=0)
    with pytest.raises(ValueError, match="max_dropped_mass"):
        PagedCache(model, max_dropped_mass=1.0)
    with pytest.raises(NotImplementedError, match="beam search"):
        options = {CACHE_ARGUMENT: PagedCache(model)}
        model.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=2, **options)
    cache = {CACHE_ARGUMENT: PagedCache(model)}
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache)
        holes = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        holes[1, 3] = 0
        with pytest.raises(ValueError, match="real tokens only"):
            model(ids[:, :1], attention_mask=holes, **cache)
    _use(model, "eager")
    with pytest.raises(RuntimeError, match="sparsify"), torch.no_grad():
        model(ids, **{CACHE_ARGUMENT: PagedCache(model)})


def test_training_steps_reduce_the_loss():
    torch.manual_seed(4)
    model = sparsify(_tiny("qwen2"), 1.5, scaling="asentmax", learn_alpha=True).train()
    ids = torch.randint(4, VOCAB, (8, 24))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0]


def test_attention_dropout_applies_in_training_only():
    torch.manual_seed(5)
    model = sparsify(_tiny("llama", attention_dropout=0.5), 1.5)
    ids = torch.randint(4, VOCAB, (2, 12))
    with torch.no_grad():
        evaluated = [model(ids).logits for _ in range(2)]
        model.train()
        trained = [model(ids).logits for _ in range(2)]
    torch.testing.assert_close(evaluated[0], evaluated[1])
    assert not torch.allclose(trained[0], trained[1])


def test_save_and_load_keeps_the_conversion(tmp_path):
    torch.manual_seed(6)
    model = sparsify(_tiny("llama"), 1.25, scaling="asentmax", heads=[1, 3], learn_alpha=True)
    _perturb_sparsa_parameters(model)
    ids, mask = _left_padded_batch()
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(str(tmp_path)).eval()
    assert loaded.config.sparsa == model.config.sparsa
    assert loaded.config._attn_implementation == "sparsa"
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
        )
    for (name, p), (loaded_name, q) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert name == loaded_name
        torch.testing.assert_close(p, q)


def test_loading_a_model_that_was_not_converted_says_so(tmp_path):
    _tiny("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not saved after sparsify"):
        from_pretrained(str(tmp_path))


def test_errors_name_the_argument():
    model = _tiny("llama")
    with pytest.raises(ValueError, match="alpha"):
        sparsify(model, 0.5)
    with pytest.raises(ValueError, match="learn_alpha"):
        sparsify(model, 2.0, learn_alpha=True)
    with pytest.raises(ValueError, match="scaling"):
        sparsify(model, scaling="focal")
    with pytest.raises(ValueError, match="heads"):
        sparsify(model, scaling="ssmax", heads=[4])
    with pytest.raises(ValueError, match="backend"):
        sparsify(model, backend="cuda")
    with pytest.raises(ValueError, match="beta_init"):
        sparsify(model, scaling="asentmax", scaling_options={"beta_init": -1.0})
    assert not any(hasattr(m, "sparsa") for m in attention_modules(model))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        sparsify(torch.nn.Linear(2, 2))
    sparsify(model)
    with pytest.raises(ValueError, match="already converted"):
        sparsify(model)


def test_unconverted_modules_and_unsupported_options_raise():
    model = _tiny("llama")
    model.set_attn_implementation("sparsa")
    with pytest.raises(ValueError, match="sparsify"):
        model(torch.randint(4, VOCAB, (1, 5)))
    module = attention_modules(sparsify(_tiny("llama")))[0]
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="causal sliding windows only"):
        sparsa_attention(module, q, q[:, :2], q[:, :2], None, is_causal=False, sliding_window=1)
    with pytest.raises(ValueError, match="additive position biases"):
        sparsa_attention(module, q, q[:, :2], q[:, :2], None, position_bias=torch.zeros(1))


def test_the_fine_tuning_example_runs(tmp_path, monkeypatch, capsys):
    script = Path(__file__).resolve().parent.parent / "examples" / "finetune_transformers.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--steps", "2", "--out", str(tmp_path / "model")])
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    assert "step    1  loss" in printed and "exact match at 24 symbols" in printed
    assert (tmp_path / "model" / "config.json").exists()


@pytest.mark.parametrize(
    ("scaling", "options"), [("log-n", {"train_length": 4}), ("position-temperature", {})]
)
def test_the_related_work_s_query_scalings_generate_what_full_forwards_give_and_reload(
    scaling, options, tmp_path
):
    torch.manual_seed(8)
    model = sparsify(_tiny("llama"), 1.0, scaling=scaling, scaling_options=options)
    _perturb_sparsa_parameters(model)
    ids, mask = _left_padded_batch()
    generated = model.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    torch.testing.assert_close(generated, _greedy_by_full_forwards(model, ids, mask, 6))
    with torch.no_grad():
        plain = sparsify(_tiny("llama"), 1.0)
        plain.load_state_dict(model.state_dict(), strict=False)
        assert not torch.allclose(
            plain(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
        )
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
        )


@pytest.mark.parametrize("row_map", ["stick-breaking", "elastic-softmax", "softpick"])
def test_a_row_map_generates_with_the_cache_what_full_forwards_give_and_reloads(row_map, tmp_path):
    torch.manual_seed(9)
    model = sparsify(_tiny("llama"), row_map=row_map)
    _perturb_sparsa_parameters(model)
    ids, mask = _left_padded_batch()
    generated = model.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    torch.testing.assert_close(generated, _greedy_by_full_forwards(model, ids, mask, 6))
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(str(tmp_path)).eval()
    assert loaded.config.sparsa["row_map"] == row_map
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
        )
    with pytest.raises(ValueError, match="decodes with transformers' dense caches"):
        _generate(model, ids, mask, 2, cache=PagedCache(model))
    with pytest.raises(ValueError, match="unknown row map"):
        sparsify(_tiny("llama"), row_map="nosuch")


def test_a_nan_in_a_converted_model_reaches_the_logits_of_later_positions_only():
    model = sparsify(_tiny("llama"), alpha=1.5)
    embeddings = model.get_input_embeddings()(torch.randint(4, VOCAB, (2, 12))).detach()
    embeddings[0, 5, 3] = float("nan")
    logits = model(inputs_embeds=embeddings).logits
    nan_positions = logits.isnan().any(-1)
    # Earlier positions may be NaN too (its value times a zero weight); the other sequence never is.
    assert bool(nan_positions[0, 5:].all()) and not bool(nan_positions[1].any())


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma3"])
def test_sliding_window_layers_match_the_original_and_generate_alike(family):
    """Windows of 4 tokens over 12: every windowed layer hides keys, with and without padding."""
    torch.manual_seed(0)
    if family == "gemma3":  # a hybrid stack: a sliding-window layer, then a full one
        config = transformers.Gemma3TextConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        )  # fmt: skip
        original = transformers.Gemma3ForCausalLM(config).eval()
    elif family == "qwen2":
        original = _tiny("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    else:
        original = _tiny("mistral", sliding_window=4)
    model = sparsify(copy.deepcopy(original), 1.0)
    ids, mask = _left_padded_batch(length=12)
    _assert_original_logits(model, original, ids, mask)
    prompt = ids[:1]
    assert torch.equal(
        model.generate(prompt, max_new_tokens=6, do_sample=False),
        original.generate(prompt, max_new_tokens=6, do_sample=False),
    )
    # A PagedCache decodes the windowed layers with the window: the dense cache's tokens and scores.
    sparse = sparsify(copy.deepcopy(original), 1.5)
    _assert_paged_generation_is_dynamic(sparse, ids, mask)


def test_the_breadth_benchmark_reports_conversions_and_refusals(tmp_path, capsys):
    from sparsa.benchmarks import hf

    assert {"llama", "gpt_neox", "bloom"} <= set(hf.architectures())
    rows = {row["model_type"]: row for row in hf.run(["llama", "gpt_neox", "bloom", "mistral"])["rows"]}
    assert rows["llama"]["status"] == rows["gpt_neox"]["status"] == rows["mistral"]["status"] == "converts"
    assert rows["llama"]["paged"] == rows["gpt_neox"]["paged"] == "same"
    assert rows["mistral"]["paged"] == "same"
    assert rows["llama"]["max_logit_difference"] <= hf.MATCH
    assert rows["bloom"]["status"] == "converts" and rows["bloom"]["paged"] == "same"
    assert main(["bench", "hf", "--models", "llama", "--out", str(tmp_path)]) == 0
    assert "| llama | converts |" in capsys.readouterr().out
    assert main(["bench", "hf", "--models", "nosuch"]) == 2
    assert "--models" in capsys.readouterr().err


def _assert_paged_generation_is_dynamic(model, ids, mask):
    """Greedy generation with a PagedCache gives the dynamic cache's tokens and scores, from one
    unpadded prompt and from the padded batch."""
    for rows, row_mask in ((ids[:1], None), (ids, mask)):
        paged_tokens, paged_scores = _generate(model, rows, row_mask, 6, PagedCache(model, page_size=4))
        tokens, scores = _generate(model, rows, row_mask, 6)
        assert torch.equal(paged_tokens, tokens)
        torch.testing.assert_close(paged_scores, scores, atol=1e-4, rtol=1e-4)


def _assert_original_logits(model, original, ids, mask):
    """The converted model gives the original's logits on the real tokens, unpadded and padded."""
    with torch.no_grad():
        for attention_mask in (None, mask):
            expected = original(ids, attention_mask=attention_mask).logits
            keep = slice(None) if attention_mask is None else attention_mask.bool()
            got = model(ids, attention_mask=attention_mask).logits
            torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=1e-5)


def _sharpened(family: str):
    """A tiny Gemma 2 (soft-capped scores, a window of 4 on every other layer) or GPT-OSS (attention
    sinks, windows, experts) whose queries are scaled up and sinks drawn at random, so that the cap
    and the sinks change the logits."""
    sizes = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4,
    )  # fmt: skip
    if family == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**sizes, attn_logit_softcapping=2.0))
    else:
        config = transformers.GptOssConfig(**sizes, num_local_experts=4, num_experts_per_tok=2)
        model = transformers.GptOssForCausalLM(config)
    with torch.no_grad():
        for module in attention_modules(model):
            module.q_proj.weight.mul_(40)
            module.k_proj.weight.mul_(10)
            if hasattr(module, "sinks"):
                module.sinks.copy_(2 * torch.randn_like(module.sinks))
    # transformers 4.56 runs them with torch SDPA by default, which leaves the soft cap out.
    model.set_attn_implementation("eager")
    return model.eval()


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
def test_soft_capped_and_sink_families_match_and_generate_with_a_paged_cache(family):
    torch.manual_seed(0)
    original = _sharpened(family)
    ids, mask = _left_padded_batch(length=12)
    model = sparsify(copy.deepcopy(original), 1.0)
    _assert_original_logits(model, original, ids, mask)
    with torch.no_grad():
        # The cap and the sinks matter here: without them the logits move by far more than the tolerance.
        plain = copy.deepcopy(original)
        if family == "gemma2":
            plain.config.attn_logit_softcapping = None
            for module in attention_modules(plain):
                module.attn_logit_softcapping = None
        else:
            for module in attention_modules(plain):
                module.sinks.fill_(float("-inf"))
        assert float((plain(ids).logits - original(ids).logits).abs().max()) > 1e-3
    sparse = sparsify(copy.deepcopy(original), 1.5)
    _assert_paged_generation_is_dynamic(sparse, ids, mask)


def test_output_attentions_returns_the_entmax_weights():
    torch.manual_seed(0)
    original = _tiny("llama")
    original.set_attn_implementation("eager")
    ids, mask = _left_padded_batch(length=10)
    real_queries = mask.bool()[:, None, :, None]
    with torch.no_grad():
        expected = original(ids, attention_mask=mask, output_attentions=True).attentions
        got = sparsify(copy.deepcopy(original), 1.0)(
            ids, attention_mask=mask, output_attentions=True
        ).attentions
        assert len(got) == len(expected) == 2
        for a, b in zip(got, expected, strict=True):
            # Eager softmax spreads a padding query's row over hidden keys; sparsa gives it zeros.
            torch.testing.assert_close(a.masked_fill(~real_queries, 0), b.masked_fill(~real_queries, 0))
        sparse = sparsify(copy.deepcopy(original), 1.5)
        weights = sparse(ids, attention_mask=mask, output_attentions=True).attentions[0]
    rows = weights.sum(-1)[real_queries[..., 0].expand_as(weights[..., 0])]
    torch.testing.assert_close(rows, torch.ones_like(rows))
    assert bool((weights == 0).any())
    assert bool((weights[~mask.bool()[:, None, None, :].expand_as(weights)] == 0).all())
    cache = PagedCache(sparse)
    sparse(ids, attention_mask=mask, **{CACHE_ARGUMENT: cache})
    step = dict(attention_mask=torch.cat([mask, mask[:, :1]], 1), output_attentions=True)
    with pytest.raises(ValueError, match="output_attentions needs transformers' dynamic cache"):
        sparse(ids[:, :1], **step, **{CACHE_ARGUMENT: cache})


def _greedy_steps(model, ids, mask, steps, cache):
    """Last-position logits (steps, B, V) of greedy decoding, one forward per token over ``cache``."""
    mask = torch.ones_like(ids) if mask is None else mask
    found = []
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, use_cache=True, **{CACHE_ARGUMENT: cache}).logits[:, -1]
        for _ in range(steps):
            found.append(logits)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            token = logits.argmax(-1, keepdim=True)
            logits = model(token, attention_mask=mask, use_cache=True, **{CACHE_ARGUMENT: cache}).logits[
                :, -1
            ]
    return torch.stack(found)


def _alibi_family(family: str):
    if family == "bloom":
        config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)
        return transformers.BloomForCausalLM(config).eval()
    config = transformers.MptConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    return transformers.MptForCausalLM(config).eval()


@pytest.mark.parametrize("family", ["bloom", "mpt"])
def test_alibi_families_convert_through_their_adapters(family, tmp_path):
    """BLOOM and MPT add ALiBi inside their modules; the adapters pass their slopes to sparsa."""
    torch.manual_seed(0)
    original = _alibi_family(family)
    ids, mask = _left_padded_batch(length=12)
    model = sparsify(copy.deepcopy(original), 1.0)
    _assert_original_logits(model, original, ids, mask)
    with torch.no_grad():
        for module in attention_modules(model):
            module.sparsa.alibi_slopes.zero_()
        assert float((model(ids).logits - original(ids).logits).abs().max()) > 1e-4
    sparse = sparsify(copy.deepcopy(original), 1.5, scaling="asentmax")
    # Stepped by hand: MPT's generate feeds the whole sequence again at every step in transformers 5.
    for rows, row_mask in ((ids[:1], None), (ids, mask)):
        paged = _greedy_steps(sparse, rows, row_mask, 6, PagedCache(sparse, page_size=4))
        torch.testing.assert_close(
            paged, _greedy_steps(sparse, rows, row_mask, 6, transformers.DynamicCache())
        )
    sparse.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(str(tmp_path)).eval()(ids).logits, sparse(ids).logits)
