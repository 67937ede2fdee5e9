"""Certified block skipping in the blocked backend, timed against an older sparsa side by side.

    python benchmarks/block_skipping.py --baseline-src /path/to/old/checkout/src [--repeats 3]

Each case runs in a fresh process per source tree (the baseline's and this
checkout's), alternating, and the table gives the median of the repeats:

- lookup-N: one teacher-forced evaluation pass of the shipped lookup ASEntmax
  model over an example of N symbols (what ``sparsa eval`` spends its time on),
  with a check that both trees predict the same tokens;
- gaussian: causal 1.5-entmax attention, B=1, H=8, N=4096, D=64, Gaussian
  scores and no ALiBi, where bounds rule almost nothing out (forward, and
  forward with backward);
- train-1k: one training step (forward, backward) of the demo lookup model on
  a batch of 8 sequences of 1,024 tokens.

A last table times the ALiBi heads of the lookup model's first layer at 16,384
symbols with the bounds and with them switched off, in this checkout alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Relative to the sparsa package a process imports: each tree reads the same weights in its own config format.
MODEL = Path("experiments/demo_models/lookup/asentmax")


def shipped_model():
    import sparsa

    return str(Path(sparsa.__file__).parent / MODEL)


CASES = ("lookup-4096", "lookup-16384", "gaussian-forward", "gaussian-backward", "train-1k")


def worker(case: str) -> dict:
    """Seconds of one case (after a warm-up call) in this process's sparsa."""
    import torch

    import sparsa
    from sparsa.experiments.data import collate, evaluation_examples
    from sparsa.models import Transformer
    from sparsa.tasks import make_task

    torch.manual_seed(0)
    predictions = None
    if case.startswith("lookup-"):
        model = Transformer.from_pretrained(shipped_model()).eval()
        batch = collate(evaluation_examples(make_task("lookup", vocab=64), 0, "test", int(case[7:]), 1))
        kept = batch.tokens.shape[1] - int((batch.labels >= 0).any(0).nonzero()[0])

        def run():
            with torch.no_grad():
                return model(batch.tokens, logits_to_keep=kept).argmax(-1)

        warm = batch.tokens[:, :256]
        with torch.no_grad():
            model(warm, logits_to_keep=4)
    elif case.startswith("gaussian-"):
        q, k, v = (torch.randn(1, 8, 4096, 64) for _ in range(3))
        backward = case == "gaussian-backward"
        q.requires_grad_(backward)

        def run():
            out = sparsa.attention(q, k, v, alpha=1.5, is_causal=True, backend="blocked")
            if backward:
                out.sum().backward()

    else:
        model = Transformer.from_pretrained(shipped_model()).train()
        tokens = torch.randint(3, 60, (8, 1024))

        def run():
            model.zero_grad()
            logits = model(tokens)
            torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()
            ).backward()

    first = run()
    start = time.perf_counter()
    last = run()
    seconds = time.perf_counter() - start
    if case.startswith("lookup-"):
        predictions = last.tolist()
    del first
    return {"seconds": seconds, "predictions": predictions}


def in_fresh_process(src: Path, case: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run(
        [sys.executable, __file__, "--worker", case], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"{case} failed under {src}:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def alibi_heads(repeats: int) -> list[list[str]]:
    """The ALiBi heads of layer 0 at 16,384 symbols: bounds on against bounds off."""
    import torch

    import sparsa
    from sparsa.attention import blocked
    from sparsa.benchmarks.timing import measure
    from sparsa.experiments.data import collate, evaluation_examples
    from sparsa.models import Transformer
    from sparsa.tasks import make_task

    model = Transformer.from_pretrained(shipped_model()).eval()
    batch = collate(evaluation_examples(make_task("lookup", vocab=64), 0, "test", 16384, 1))
    captured = {}

    def observe(q, k, **options):
        captured.setdefault("q", q)
        captured.setdefault("k", k)
        captured.setdefault("options", options)

    layer = model.blocks[0].attention
    layer.observer = observe
    with torch.no_grad():
        model(batch.tokens, logits_to_keep=1)
    layer.observer = None
    options = captured["options"]
    heads = torch.nonzero(options["alibi_slopes"] != 0).view(-1)
    q, k = captured["q"][:, heads], captured["k"][:, heads]
    alpha = options["alpha"]
    alpha = alpha[heads] if isinstance(alpha, torch.Tensor) else alpha
    v = torch.randn_like(k)

    def attend():
        with torch.no_grad():
            return sparsa.attention(
                q,
                k,
                v,
                alpha=alpha,
                is_causal=True,
                alibi_slopes=options["alibi_slopes"][heads],
                return_stats=True,
            )

    _, with_bounds = measure(attend, repeats)
    stats = attend()[1]
    shortest = blocked.MIN_BOUNDED_KEYS
    blocked.MIN_BOUNDED_KEYS = 1 << 40  # every key sequence is shorter: the bounds never run
    try:
        _, without = measure(attend, repeats)
    finally:
        blocked.MIN_BOUNDED_KEYS = shortest
    unscored = f"{float(stats.unscored_key_blocks.mean()):.3f}"
    return [
        [
            f"{len(heads)} ALiBi heads, 16,384 keys",
            f"{without:.3f}",
            f"{with_bounds:.3f}",
            f"{with_bounds / without:.3f}x",
            unscored,
        ]
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-src", type=Path, help="the src folder of the sparsa to compare against")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return 0
    if args.baseline_src is None or not (args.baseline_src / "sparsa").is_dir():
        parser.error("--baseline-src must name a folder that holds the sparsa package")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    from sparsa.benchmarks.timing import machine, machine_line, markdown

    rows = []
    for case in args.cases:
        times = {"baseline": [], "this": []}
        predictions = {}
        for _ in range(args.repeats):
            for name, src in (("baseline", args.baseline_src), ("this", ROOT / "src")):
                result = in_fresh_process(src, case)
                times[name].append(result["seconds"])
                predictions[name] = result["predictions"]
        old, new = statistics.median(times["baseline"]), statistics.median(times["this"])
        same = (
            ""
            if predictions["this"] is None
            else ("yes" if predictions["this"] == predictions["baseline"] else "NO")
        )
        rows.append([case, f"{old:.3f}", f"{new:.3f}", f"{old / new:.2f}x", same])
    print(
        markdown(
            ["case", "baseline s", "this s", "speed-up", "same predictions"],
            {"baseline s", "this s", "speed-up"},
            rows,
        )
    )
    print()
    heads = alibi_heads(args.repeats)
    print(
        markdown(
            ["attention", "bounds off s", "bounds on s", "on / off", "unscored key blocks"],
            {"bounds off s", "bounds on s", "on / off", "unscored key blocks"},
            heads,
        )
    )
    print()
    print(f"{args.repeats} repeats (median); {machine_line(machine())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
