"""Decode benchmark: one decoding step of one attention layer over a long KV cache.

The layer is that of a common 8B model: H = 32 query heads, Hkv = 8 key/value
heads, D = 128, 1.5-entmax, one new query per batch row. For each cache kind,
context length, batch size and dtype it times, on the same cache:

- torch SDPA (softmax): the heads of a KV group as queries of one head, so
  that K and V are not repeated (one query needs no causal mask);
- sparsa's dense decode: ``sparsa.attention`` over the contiguous cache;
- the paged decode: ``sparsa.attention.decode`` over a ``PagedKVCache``
  (pages of 16 tokens), exact;
- the bandwidth floor: reading K and V once (a sum over each).

Caches: "synthetic" mimics trained heads (NAPE: half the query heads ALiBi
with slopes 1, 1/2, ..., 1/16, whose weight stays local; the other half NoPE
content heads whose query matches two earlier keys); "structured" has no
position bias and gives each query head a few keys of high score, while every
key carries a large component orthogonal to its group's queries, as trained
keys do: the per-page min/max bounds then rule out nothing and only the key
sketches can; "gaussian" is q, k, v ~ N(0, 1) without position bias, where most
keys are in the support. The
``model`` rows decode the shipped ASEntmax demo model's own queries and keys
(D = 16, 2051 tokens: too short to time, they say what the page bounds
certify on each head type).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import sparsa
from sparsa.attention import PagedKVCache, decode, sketch_kernels

from .timing import machine, machine_line, markdown, measure_interleaved, ratio

HEADS, KV_HEADS, HEAD_DIM, PAGE_SIZE, ALPHA = 32, 8, 128, 16, 1.5
FULL_LENGTHS = (16384, 65536, 262144, 1048576)
QUICK_LENGTHS = (2048,)
LONGEST_BATCHED = 262144
"""Beyond this context only batch 1 runs (1M tokens of 4 rows would not fit in memory here)."""
CACHES = ("synthetic", "structured", "gaussian")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MATCHED_KEYS = 2
STRUCTURED_KEYS = 4
"""Keys of high score per query head in the structured cache."""
ORTHOGONAL_SCALE = 3.0
"""Standard deviation of the structured keys' component orthogonal to their group's queries."""
STRUCTURED_CHUNK = 65536
"""Keys built at a time in the structured cache (bounds its temporaries)."""


def make_inputs(kind: str, batch: int, length: int, dtype: torch.dtype, seed: int = 0):
    """q (B, H, 1, D), k and v (B, Hkv, N, D), ALiBi slopes (H,) for one cache kind."""
    generator = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, KV_HEADS, length, HEAD_DIM, generator=generator)
    v = torch.randn(batch, KV_HEADS, length, HEAD_DIM, generator=generator)
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, generator=generator)
    slopes = torch.zeros(HEADS)
    if kind == "synthetic":
        local = HEADS // 2
        slopes[:local] = 1.0 / torch.arange(1, local + 1)
        group = HEADS // KV_HEADS
        for head in range(local, HEADS):
            matched = torch.randint(0, length, (batch, MATCHED_KEYS), generator=generator)
            keys = k[torch.arange(batch)[:, None], head // group, matched]
            q[:, head, 0] = 3.0 * keys.mean(1) + 0.3 * q[:, head, 0]
    elif kind == "structured":
        _structured_keys(q, k, generator)
    elif kind != "gaussian":
        raise ValueError(f"cache kind must be one of {CACHES}, got {kind!r}")
    return q.to(dtype), k.to(dtype), v.to(dtype), slopes


def _structured_keys(q: torch.Tensor, k: torch.Tensor, generator: torch.Generator) -> None:
    """Overwrite k with keys whose scores are low (N(0, 1/4)) but for STRUCTURED_KEYS per query head
    (score about 3 |q|^2 / sqrt(D)), each with a large component orthogonal to its group's queries.

    Built a chunk of keys at a time, so a 1M-token cache needs no full-size temporaries."""
    batch, heads = q.shape[0], q.shape[1]
    length = k.shape[2]
    group = heads // KV_HEADS
    queries = q[:, :, 0].view(batch, KV_HEADS, group, HEAD_DIM)
    basis = torch.linalg.qr(queries.transpose(-1, -2)).Q
    # In-span part: 0.5 |q|/sqrt(D) N(0, 1) along each query's solve, so scores stay N(0, 1/4).
    solve = torch.linalg.pinv(queries).transpose(-1, -2) * HEAD_DIM**0.5
    for start in range(0, length, STRUCTURED_CHUNK):
        end = min(length, start + STRUCTURED_CHUNK)
        wide = ORTHOGONAL_SCALE * torch.randn(batch, KV_HEADS, end - start, HEAD_DIM, generator=generator)
        wide -= (wide @ basis) @ basis.transpose(-1, -2)
        scores = 0.5 * torch.randn(batch, KV_HEADS, end - start, group, generator=generator)
        k[:, :, start:end] = wide.add_(scores @ solve)
    for head in range(heads):
        kv_head = head // group
        matched = torch.randint(0, length, (batch, STRUCTURED_KEYS), generator=generator)
        rows = torch.arange(batch)[:, None]
        k[rows, kv_head, matched] += 3.0 * q[:, head, 0][:, None]


def _paged(k: torch.Tensor, v: torch.Tensor) -> tuple[PagedKVCache, torch.Tensor, torch.Tensor]:
    """The cache, and K and V as views of its pages (so the baselines read the same memory)."""
    batch, kv_heads, length, dim = k.shape
    cache = PagedKVCache(batch, kv_heads, dim, page_size=PAGE_SIZE, dtype=k.dtype)
    cache.append(k, v)
    keys = cache.keys.view(batch, kv_heads, -1, dim)[:, :, :length]
    values = cache.values.view(batch, kv_heads, -1, dim)[:, :, :length]
    return cache, keys, values


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    batch, heads, _, dim = q.shape
    grouped = q.view(batch, k.shape[1], heads // k.shape[1], dim)
    return torch.nn.functional.scaled_dot_product_attention(grouped, k, v)


def _floor(k: torch.Tensor, v: torch.Tensor) -> None:
    k.sum()
    v.sum()


def measure_case(kind: str, batch: int, length: int, dtype_name: str, repeats: int, seed: int) -> dict:
    q, k, v, slopes = make_inputs(kind, batch, length, DTYPES[dtype_name], seed)
    cache, keys, values = _paged(k, v)
    del k, v

    def dense():
        return sparsa.attention(q, keys, values, alpha=ALPHA, is_causal=True, alibi_slopes=slopes)

    def paged():
        return decode(q, cache, alpha=ALPHA, alibi_slopes=slopes)

    times = measure_interleaved(
        {
            "sdpa": lambda: _sdpa(q, keys, values),
            "dense": dense,
            "paged": paged,
            "floor": lambda: _floor(keys, values),
        },
        repeats,
    )
    out, stats = decode(q, cache, alpha=ALPHA, alibi_slopes=slopes, return_stats=True)
    error = float((out.float() - dense().float()).abs().max())
    local = slopes > 0
    total_bytes = 2 * keys.numel() * keys.element_size()
    row = {
        "cache": kind,
        "batch": batch,
        "length": length,
        "dtype": dtype_name,
        **{f"{name}_ms": 1000 * seconds for name, seconds in times.items()},
        "paged_vs_dense": times["paged"] / times["dense"],
        "paged_vs_floor": times["paged"] / times["floor"],
        "dense_vs_sdpa": times["dense"] / times["sdpa"],
        "pages_read": _share(stats.pages_read, stats.pages_visible),
        "pages_read_alibi_heads": _share(stats.pages_read[:, local], stats.pages_visible[:, local]),
        "pages_read_nope_heads": _share(stats.pages_read[:, ~local], stats.pages_visible[:, ~local]),
        "support_pages": _support_share(stats),
        "bytes_read": stats.bytes_read / total_bytes,
        "dense_rows": float(stats.dense.float().mean()),
        "sketch_kernel": stats.sketch_kernel,
        "coarse_sketch_kernel": stats.coarse_sketch_kernel,
        "max_abs_error": error,
    }
    return row


def _share(part: torch.Tensor, whole: torch.Tensor) -> float | None:
    return float(part.sum()) / float(whole.sum()) if whole.numel() and float(whole.sum()) else None


def _support_share(stats) -> float | None:
    known = stats.support_pages >= 0
    return _share(stats.support_pages[known], stats.pages_visible[known])


def model_certificates(length: int = 1024, seed: int = 0, every: int = 8) -> list[dict]:
    """What the page bounds rule out, per layer and head type, on the demo model's own queries and keys.

    For every ``every``-th answer row of one copy example (``length`` symbols)
    the cache holds the keys up to that row. A page is ruled out when its bound is below
    the threshold of the first group of pages (exactly what ``decode`` skips);
    a page holds support when one of its keys has nonzero weight (from the
    dense weights).
    """
    from sparsa.experiments.demo import SHIPPED
    from sparsa.models import Transformer
    from sparsa.tasks import make_task, sample

    model = Transformer.from_pretrained(SHIPPED / "copy" / "asentmax").eval()
    example = sample(make_task("copy", vocab=1024, distinct=1), seed, "test", length, 0)
    captured = []

    def observe(q, k, **options):
        captured.append((q, k, options))

    for block in model.blocks:
        block.attention.observer = observe
    with torch.no_grad():
        model(torch.from_numpy(example.tokens)[None])
    for block in model.blocks:
        block.attention.observer = None
    rows = []
    answer = len(example.tokens) - example.prompt
    for layer, (q, k, options) in enumerate(captured):
        candidates, support, visible = _page_shares(
            q, k, options, range(len(example.tokens) - answer, len(example.tokens), every)
        )
        slopes = options["alibi_slopes"]
        local = slopes > 0 if slopes is not None else torch.zeros(q.shape[1], dtype=torch.bool)
        for name, heads in (("alibi", local), ("nope", ~local)):
            if bool(heads.any()):
                rows.append({
                    "layer": layer + 1, "heads": name, "tokens": k.shape[2], "queries": -(-answer // every),
                    "ruled_out": 1 - _share(candidates[heads], visible[heads]),
                    "support_pages": _share(support[heads], visible[heads]),
                })  # fmt: skip
    return rows


def _page_shares(q, k, options, positions: range):
    """Per head (H, rows): candidate pages by the bounds, pages holding support, visible pages."""
    candidates, support, visible = [], [], []
    cache = PagedKVCache(1, k.shape[1], k.shape[3], page_size=PAGE_SIZE)
    for position in positions:
        keys = k[:, :, : position + 1]
        new = k[:, :, int(cache.lengths[0]) : position + 1]
        cache.append(new, torch.zeros_like(new))
        query = q[:, :, position : position + 1]
        slopes = options["alibi_slopes"]
        _, stats = decode(
            query, cache, alpha=options["alpha"], alibi_slopes=slopes, dense_below=0, return_stats=True
        )
        scores = (query @ keys.transpose(-1, -2)) / k.shape[3] ** 0.5
        if slopes is not None:
            scores = scores + slopes[:, None, None] * (torch.arange(position + 1) - position)
        weights = sparsa.entmax(scores, options["alpha"])[0, :, 0]
        pages = -(-(position + 1) // PAGE_SIZE)
        padded = torch.nn.functional.pad(weights, (0, pages * PAGE_SIZE - position - 1))
        support.append((padded.view(-1, pages, PAGE_SIZE) > 0).any(-1).sum(-1))
        candidates.append(stats.candidate_pages[0, :, 0])
        visible.append(stats.pages_visible[0, :, 0])
    return torch.stack(candidates, 1), torch.stack(support, 1), torch.stack(visible, 1)


def run(lengths, batches, dtypes, caches, repeats: int = 3, seed: int = 0, progress=None) -> dict:
    result = {
        "benchmark": "decode",
        **machine(),
        "heads": HEADS,
        "kv_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "page_size": PAGE_SIZE,
        "alpha": ALPHA,
        "model": model_certificates(),
        "rows": [],
    }
    for length in lengths:
        for batch in batches:
            if batch > 1 and length > LONGEST_BATCHED:
                continue
            for dtype in dtypes:
                for kind in caches:
                    result["rows"].append(measure_case(kind, batch, length, dtype, repeats, seed))
                    if progress is not None:
                        progress(result)
    return result


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def markdown_table(result: dict) -> str:
    headers = ["cache", "B", "N", "dtype", "SDPA ms", "dense ms", "paged ms", "floor ms", "paged / dense",
               "paged / floor", "pages read", "ALiBi heads", "NoPE heads", "support pages", "bytes read",
               "4-bit / int8 sketch kernel", "max error"]  # fmt: skip
    rows = [
        [row["cache"], str(row["batch"]), str(row["length"]), row["dtype"], f"{row['sdpa_ms']:.1f}",
         f"{row['dense_ms']:.1f}", f"{row['paged_ms']:.1f}", f"{row['floor_ms']:.1f}",
         ratio(row["paged_vs_dense"]), ratio(row["paged_vs_floor"]), _percent(row["pages_read"]),
         _percent(row["pages_read_alibi_heads"]), _percent(row["pages_read_nope_heads"]),
         _percent(row["support_pages"]), _percent(row["bytes_read"]), _kernels(row),
         f"{row['max_abs_error']:.1e}"]
        for row in result["rows"]
    ]  # fmt: skip
    right = set(headers[1:3]) | set(headers[4:]) - {"4-bit / int8 sketch kernel"}
    return markdown(headers, right, rows)


def _kernels(row: dict) -> str:
    """The 4-bit and int8 sketch kernels a case used ("-": that sketch did not run; "": neither did)."""
    names = [row.get("coarse_sketch_kernel"), row.get("sketch_kernel")]
    return "" if names == [None, None] else " / ".join(name or "-" for name in names)


def model_table(result: dict) -> str:
    headers = ["layer", "heads", "tokens", "answer rows", "pages ruled out", "pages holding support"]
    rows = [
        [str(r["layer"]), r["heads"], str(r["tokens"]), str(r["queries"]), _percent(r["ruled_out"]),
         _percent(r["support_pages"])]
        for r in result["model"]
    ]  # fmt: skip
    return markdown(headers, set(headers[2:]), rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..experiments.options import positive_int

    parser.add_argument(
        "--quick", action="store_true", help=f"one short context ({QUICK_LENGTHS[0]}), batch 1"
    )
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=None,
                        help=f"context lengths (default {list(FULL_LENGTHS)})")  # fmt: skip
    parser.add_argument("--batches", type=positive_int, nargs="+", default=None, help="default 1 4")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None, help="default fp32 bf16")
    parser.add_argument("--caches", nargs="+", choices=list(CACHES), default=None, help="default both")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed calls after a warm-up call")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random caches")
    parser.add_argument("--out", type=Path, default=Path("results/bench"), help="folder for decode.json")


def _calibration_line() -> str:
    lines = []
    for coarse, name in ((True, "4-bit"), (False, "int8")):
        dim = sketch_kernels.nibble_dim(HEAD_DIM) if coarse else HEAD_DIM
        found = sketch_kernels.calibration("cpu", dim, PAGE_SIZE, coarse=coarse)
        times = ", ".join(f"{kernel} {ms:.2f} ms" for kernel, ms in found.milliseconds.items())
        rejected = f"; rejected as inexact: {', '.join(found.rejected)}" if found.rejected else ""
        lines.append(f"{name} {found.kernel} ({times}{rejected})")
    return ", ".join(lines)


def run_from_args(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "decode.json"

    def save(partial: dict) -> None:
        path.write_text(json.dumps(partial, indent=2))
        last = partial["rows"][-1]
        print(f"measured {last['cache']} B={last['batch']} N={last['length']} {last['dtype']}", flush=True)

    result = run(
        args.lengths or (QUICK_LENGTHS if args.quick else FULL_LENGTHS),
        args.batches or ((1,) if args.quick else (1, 4)),
        args.dtypes or list(DTYPES),
        args.caches or list(CACHES),
        repeats=args.repeats,
        seed=args.seed,
        progress=save,
    )
    path.write_text(json.dumps(result, indent=2))
    print(markdown_table(result))
    print(
        f"\nMachine: {machine_line(result)}; sketch kernels chosen by calibration: {_calibration_line()}.\n"
    )
    print(model_table(result))
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsa bench decode", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
