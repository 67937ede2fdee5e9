"""The decoder-only model: cached decoding, padding, generation, save/load, training."""

import json

import pytest
import torch
import torch.nn.functional as F

from sparsa.experiments.variants import RELATED_VARIANTS, variant_fields
from sparsa.models import Transformer, TransformerConfig

VARIANTS = [
    {"alpha": 1.0},
    {"alpha": 1.0, "scaling": "ssmax"},
    {"alpha": 1.5},
    {"alpha": 1.5, "scaling": "asentmax"},
    {"alpha": 1.5, "scaling": "asentmax-static", "positions": "rope"},
    {"alpha": 2.0, "scaling": "learned-temperature", "positions": "alibi"},
    {"alpha": 1.5, "learn_alpha": True, "positions": "rope+nape", "scaling": "asentmax"},
    {"alpha": 1.25, "positions": "nope", "n_kv_heads": 1},
    {"alpha": 1.5, "scaling": "asentmax", "window": 4, "window_layers": [0]},
    {"alpha": 1.0, "positions": "rope", "window": 5},
]


RELATED = [
    {**variant_fields(name), "scaling_options": {"train_length": 8}}
    if variant_fields(name)["scaling"] == "log-n"
    else variant_fields(name)
    for name in RELATED_VARIANTS
]
"""The related work's mechanisms, as the experiments' variant table gives them."""


def _ids(v):
    return "-".join(f"{k}={v[k]}" for k in v)


def _model(**overrides) -> Transformer:
    options = {"vocab_size": 29, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, **overrides}
    model = Transformer(TransformerConfig(**options)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _left_padded_batch():
    ids = torch.randint(0, 29, (3, 21))
    mask = torch.ones(3, 21, dtype=torch.long)
    mask[0, :7] = 0
    mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize("variant", VARIANTS + RELATED, ids=_ids)
@pytest.mark.parametrize("padded", [False, True])
def test_cached_decoding_equals_the_full_forward(variant, padded):
    model = _model(**variant)
    ids, mask = _left_padded_batch()
    if variant.get("row_map") == "topk-softmax":
        # Top-k jumps where the k-th and (k+1)-th scores tie. A repeated token ties exactly in NoPE
        # heads, and rounding (one query against twenty at once) decides such ties: distinct tokens
        # in fp64 leave no tie for rounding to break.
        model, ids = model.double(), torch.stack([torch.randperm(29)[:21] for _ in range(3)])
    if not padded:
        mask = torch.ones_like(mask)
    full = model(ids, attention_mask=mask)
    cache = model.new_cache()
    pieces = [model(ids[:, :9], attention_mask=mask[:, :9], cache=cache)]
    pieces.append(model(ids[:, 9:12], attention_mask=mask[:, :12], cache=cache))
    pieces += [model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache) for t in range(12, 21)]
    real = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, dim=1)[real], full[real], atol=1e-5, rtol=1e-5)
    assert cache.length == 21


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
@pytest.mark.parametrize("cache", [None, "dense", "paged"])
def test_logits_of_the_last_positions_equal_those_of_the_full_forward(variant, cache):
    """The last block attends from the kept positions only; the logits must not change."""
    model = _model(**variant)
    ids, mask = _left_padded_batch()
    full = model(ids, attention_mask=mask)
    for keep in (1, 4, 21, 30):
        if cache is None:
            kept = model(ids, attention_mask=mask, logits_to_keep=keep)
        else:
            store = model.new_cache(page_size=None if cache == "dense" else 4)
            model(ids[:, :9], attention_mask=mask[:, :9], cache=store)
            kept = model(ids[:, 9:], attention_mask=mask, cache=store, logits_to_keep=keep)
        rows = min(keep, 21 if cache is None else 12)
        torch.testing.assert_close(kept, full[:, 21 - rows :], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window_layers", [None, [1]])
def test_a_window_limits_how_far_back_a_token_sees(window_layers):
    """With every layer windowed, position t sees tokens from t - layers (W - 1) on, and no further;
    one full layer sees them all."""
    model = _model(alpha=1.5, window=3, window_layers=window_layers)
    ids = torch.randint(0, 29, (1, 16))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 29
    moved = (model(ids) - model(changed)).abs().amax(-1)[0]
    reach = 2 * (3 - 1)
    assert bool((moved[: reach + 1] > 0).all())
    if window_layers is None:
        assert bool((moved[reach + 1 :] == 0).all())
    else:
        assert bool((moved > 0).all())


def test_a_paged_cache_refuses_row_maps_and_names_the_dense_one():
    model = _model(row_map="sigmoid")
    ids, mask = _left_padded_batch()
    with pytest.raises(ValueError, match="decodes with the dense cache"):
        model(ids, attention_mask=mask, cache=model.new_cache(page_size=4))


@pytest.mark.parametrize("variant", VARIANTS[1:4], ids=_ids)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_the_unpadded_sequence(variant, side):
    model = _model(**variant)
    ids = torch.randint(0, 29, (1, 13))
    alone = model(ids)
    pad = torch.randint(0, 29, (1, 6))
    padded = torch.cat((pad, ids) if side == "left" else (ids, pad), dim=1)
    mask = torch.ones(1, 19, dtype=torch.long)
    mask[:, :6] = 0 if side == "left" else 1
    mask[:, 13:] = 1 if side == "left" else 0
    batch = torch.cat((padded, torch.randint(0, 29, (1, 19))), dim=0)
    batch_mask = torch.cat((mask, torch.ones_like(mask)), dim=0)
    logits = model(batch, attention_mask=batch_mask)[:1]
    got = logits[:, 6:] if side == "left" else logits[:, :13]
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)


def _greedy_by_full_forwards(model, ids, mask, steps):
    for _ in range(steps):
        next_token = model(ids, attention_mask=mask)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat((ids, next_token), dim=1)
        mask = torch.cat((mask, torch.ones_like(next_token)), dim=1)
    return ids


@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[3], VARIANTS[4]], ids=_ids)
def test_generate_equals_greedy_decoding_by_full_forwards(variant):
    model = _model(**variant)
    ids, mask = _left_padded_batch()
    expected = _greedy_by_full_forwards(model, ids, mask, 12)
    assert torch.equal(model.generate(ids, 12, attention_mask=mask), expected)
    assert torch.equal(model.generate(ids[1:2], 12), expected[1:2])


def test_generate_stops_rows_at_eos_and_pads_them():
    model = _model()
    ids, mask = _left_padded_batch()
    free = model.generate(ids, 10, attention_mask=mask)
    eos = int(free[0, 21 + 2])
    out = model.generate(ids, 10, attention_mask=mask, eos_token_id=eos, pad_token_id=28)
    for row in range(3):
        new = out[row, 21:].tolist()
        if eos in new:
            first = new.index(eos)
            assert all(t == 28 for t in new[first + 1 :])
            assert new[:first] == free[row, 21 : 21 + first].tolist()
    assert out.shape[1] <= free.shape[1]


def test_sampling_is_reproducible_with_a_generator_and_respects_top_k():
    model = _model()
    ids = torch.randint(0, 29, (2, 5))
    runs = [
        model.generate(ids, 8, temperature=1.0, generator=torch.Generator().manual_seed(3)) for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    top1 = model.generate(ids, 8, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(top1, model.generate(ids, 8))


@pytest.mark.parametrize(
    "variant", [{}, {"tie_embeddings": False, "scaling": "asentmax", "learn_alpha": True}]
)
def test_save_and_load_round_trip(tmp_path, variant):
    model = _model(**variant)
    ids = torch.randint(0, 29, (2, 15))
    model.save_pretrained(tmp_path / "model")
    meta = json.loads((tmp_path / "model" / "config.json").read_text())
    assert meta["config"]["scaling"] == model.config.scaling
    loaded = Transformer.from_pretrained(tmp_path / "model").eval()
    assert loaded.config == model.config
    assert torch.equal(loaded(ids), model(ids))
    assert loaded.config.tie_embeddings == (loaded.head.weight is loaded.embed.weight)


def test_weights_stored_in_half_precision_load_into_fp32(tmp_path):
    model = _model(scaling="asentmax")
    ids = torch.randint(0, 29, (2, 15))
    model.save_pretrained(tmp_path / "half", dtype=torch.float16)
    loaded = Transformer.from_pretrained(tmp_path / "half").eval()
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(loaded(ids), model(ids), atol=2e-3, rtol=2e-3)
    assert (tmp_path / "half" / "model.safetensors").stat().st_size < 0.6 * 4 * model.num_parameters()


def test_loading_reports_missing_files_and_unknown_fields(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        Transformer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unknown TransformerConfig fields"):
        TransformerConfig.from_dict({"vocab_size": 4, "n_experts": 2})


def test_parameter_count_counts_tied_weights_once():
    config = TransformerConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64, positions="nape")
    tied = Transformer(config)
    per_block = 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32
    assert tied.num_parameters() == 50 * 32 + 2 * per_block + 32
    assert tied.num_parameters(exclude_embeddings=True) == 2 * per_block + 32
    config.tie_embeddings = False
    assert Transformer(config).num_parameters() == 2 * 50 * 32 + 2 * per_block + 32


def test_dropout_is_active_in_training_only():
    model = _model(dropout=0.3)
    ids = torch.randint(0, 29, (2, 9))
    assert torch.equal(model(ids), model(ids))
    model.train()
    assert not torch.equal(model(ids), model(ids))


def _copy_batch(generator, batch=16, length=8, vocab=12):
    source = torch.randint(3, vocab, (batch, length), generator=generator)
    bos = torch.zeros(batch, 1, dtype=torch.long)
    sep = torch.ones(batch, 1, dtype=torch.long)
    return torch.cat((bos, source, sep, source), dim=1)


@pytest.mark.parametrize("variant", VARIANTS[:4], ids=_ids)
def test_training_on_a_copy_task_reduces_the_loss(variant):
    model = Transformer(TransformerConfig(vocab_size=12, d_model=32, n_layers=2, n_heads=4, **variant))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(250):
        sequence = _copy_batch(generator)
        logits = model(sequence[:, :-1])[:, 9:]
        loss = F.cross_entropy(logits.reshape(-1, 12), sequence[:, 10:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.75 * first, (first, last)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m: m(torch.tensor([[0, 29]])), ValueError, "input_ids must lie in"),
        (lambda m: m(torch.zeros(2, 3)), TypeError, "integer token ids"),
        (lambda m: m(torch.zeros(1, 3, dtype=torch.long), logits_to_keep=0), ValueError, "logits_to_keep"),
        (
            lambda m: m.generate(
                torch.zeros(1, 3, dtype=torch.long), 2, attention_mask=torch.tensor([[1, 1, 0]])
            ),
            ValueError,
            "left padding",
        ),
        (lambda m: m.generate(torch.zeros(1, 3, dtype=torch.long), -1), ValueError, "max_new_tokens"),
        (
            lambda m: m.generate(torch.zeros(1, 3, dtype=torch.long), 2, temperature=-1.0),
            ValueError,
            "temperature",
        ),
    ],
)
def test_bad_model_input_is_named(call, error, message):
    with pytest.raises(error, match=message):
        call(_model())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"d_model": 30}, "divisible"),
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"scaling": "focal"}, "scaling"),
        ({"row_map": "nosuch"}, "unknown row map"),
        ({"row_map": "topk-softmax", "row_options": {"q": 1}}, "takes options"),
        ({"gate": "channel"}, "gate must be one of"),
        ({"positions": "yarn"}, "positions"),
        ({"dropout": 1.0}, "dropout"),
        ({"n_layers": 0}, "n_layers"),
        ({"window": 0}, "window must be None or a positive integer"),
        ({"window_layers": [0]}, "window_layers needs a window"),
        ({"window": 4, "window_layers": [0, 4]}, r"window_layers must be layer indices in \[0, 4\)"),
    ],
)
def test_bad_config_is_named(fields, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**{"vocab_size": 10, "d_model": 32, "n_heads": 4, **fields})
