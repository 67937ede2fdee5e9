import json
import subprocess
import sys

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
