import json
import subprocess
import sys

import pytest
import torch

import sparsa
from sparsa.cli import main


def test_version_from_the_installed_command():
    result = subprocess.run(
        [sys.executable, "-m", "sparsa.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == f"sparsa {sparsa.__version__}"


def test_bench_normalizers_quick_writes_table_and_json(tmp_path, capsys):
    assert main(["bench", "normalizers", "--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| 256x256 | sparsa.entmax15 |" in table
    result = json.loads((tmp_path / "normalizers.json").read_text())
    rows = {(row["case"], row["method"]): row for row in result["rows"]}
    baseline = rows[("256x256", "torch.softmax")]
    assert baseline["forward_vs_softmax"] == 1.0
    entmax15 = rows[("256x256", "sparsa.entmax15")]
    assert entmax15["max_abs_error"] < 1e-6
    assert entmax15["forward_vs_counterpart"] > 0
    assert {case for case, _ in rows} == {"256x256", "4x4096"}


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "bench" in capsys.readouterr().out


def test_attention_benchmark_inputs_and_table():
    from sparsa.benchmarks import attention as bench

    q, k, _ = bench.make_inputs(128, "trained", seed=0)
    scores = (q @ k.transpose(-1, -2)) / bench.HEAD_DIM**0.5
    visible = torch.ones(128, 128, dtype=torch.bool).tril()
    top = scores.masked_fill(~visible, -torch.inf).topk(2, -1).values
    # Trained-like: each query has a key that stands far above the typical score.
    assert (top[..., 0] - scores.masked_fill(~visible, 0).std()).median() > 3
    row = {
        "length": 128,
        "scores": "trained",
        "method": "sparsa",
        "forward_s": 0.5,
        "forward_backward_s": 1.0,
        "forward_backward_peak_mib": 12.0,
        "forward_vs_sdpa": 2.0,
        "forward_backward_vs_sdpa": 1.5,
        "skipped_fraction": 0.5,
        "mean_support": 2.0,
    }
    table = bench.markdown_table({"rows": [row]})
    assert "| 128 | trained | sparsa | 0.500 | 2.00x |  | 1.000 | 1.50x |  | 12 | 0.50 | 2.0 |" in table


def test_gpu_benchmark_table():
    from sparsa.benchmarks import gpu

    row = {"batch": 1, "heads": 16, "dim": 64, "length": 4096, "trained_like": True, "tiles": "64x32x8",
           "sdpa_fwd_ms": 0.5, "sdpa_fwd_bwd_ms": 2.0, "sparsa_fwd_ms": 1.0, "sparsa_fwd_bwd_ms": 3.0,
           "adasplash_fwd_ms": None, "adasplash_fwd_bwd_ms": 6.0,
           "mean_support": 1.5, "skipped_fraction": 0.75, "mean_threshold_passes": 0.5}  # fmt: skip
    table = gpu.table([row])
    assert "| 1 | 64 | 4096 | trained-like | 64x32x8 | 1.00 | 2.00x | n/a | 3.00 | 1.50x | 0.50x |" in table
    assert "| 1.5 | 0.75 | 0.5 |" in table


def test_gpu_benchmark_runs_through_on_cpu(monkeypatch):
    """The benchmark's loop, with Triton's interpreter for the GPU and one call for the timer."""
    pytest.importorskip("triton")
    from sparsa.attention.triton import TileSizes
    from sparsa.benchmarks import gpu

    def one_call(fn, backward):
        out = fn()
        if backward:
            out.float().sum().backward()
        return 1.0

    monkeypatch.setattr(gpu, "_time", one_call)
    sizes = [TileSizes(), TileSizes(16, 64, 2)]
    rows = gpu.run([40], [1], [16], 2, sizes, device="cpu")
    assert [(r["trained_like"], r["tiles"]) for r in rows] == [
        (True, "32x32x4"), (True, "16x64x2"), (False, "32x32x4"), (False, "16x64x2")
    ]  # fmt: skip
    assert all(r["sdpa_fwd_bwd_ms"] == r["sparsa_fwd_bwd_ms"] == 1.0 for r in rows)
    assert all(r["mean_threshold_passes"] == 0 for r in rows if r["trained_like"])
    assert "| 1 | 16 | 40 | gaussian | 16x64x2 |" in gpu.table(rows)
    checks = gpu.check_correctness([50], sizes, device="cpu")
    assert [(c["dtype"], c["tiles"]) for c in checks] == [
        ("torch.float32", "32x32x4"), ("torch.float32", "16x64x2"),
        ("torch.bfloat16", "32x32x4"), ("torch.bfloat16", "16x64x2"),
    ]  # fmt: skip
    assert all(c["out_error"] < 1e-5 and max(c["grad_relative_errors"]) < 1e-5 for c in checks[:2])


def test_bench_attention_command_is_registered(capsys):
    try:
        main(["bench", "attention", "--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert "--lengths" in capsys.readouterr().out
