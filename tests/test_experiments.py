"""Training, resuming, distributed training, evaluation, results and the command line."""

import dataclasses
import importlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsa.cli import main
from sparsa.experiments import results
from sparsa.experiments.data import training_batch
from sparsa.experiments.evaluate import decoded_correctly, evaluate
from sparsa.experiments.train import CHECKPOINT, RunConfig, learning_rate, train
from sparsa.models import Transformer
from sparsa.tasks import IGNORE, make_task
from sparsa.tasks.base import sample

TINY = {"d_model": 16, "n_layers": 1, "n_heads": 2}


def _config(**overrides):
    fields = {
        "task": "copy",
        "task_options": {"vocab": 6},
        "variant": "asentmax",
        "model": TINY,
        "min_length": 3,
        "max_length": 5,
        "steps": 6,
        "batch_size": 4,
        "warmup_steps": 2,
        "eval_every": 3,
        "checkpoint_every": 3,
        "log_every": 2,
        "val_examples": 4,
        **overrides,
    }
    return RunConfig(**fields)


def _weights(run_dir):
    return torch.load(Path(run_dir) / CHECKPOINT, weights_only=True)["model"]


def test_training_batches_depend_only_on_seed_and_step():
    task = make_task("copy", vocab=6)
    a = training_batch(task, 1, 7, 8, (3, 5))
    b = training_batch(task, 1, 7, 8, (3, 5))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)
    assert not torch.equal(training_batch(task, 1, 8, 8, (3, 5)).tokens[:, :4], a.tokens[:, :4])
    lengths = (a.tokens != 0).sum(1)
    assert int(lengths.min()) >= 2 * 3 + 3 and int(lengths.max()) <= 2 * 5 + 3


def test_learning_rate_warms_up_then_decays_to_the_floor():
    config = _config(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    rates = [learning_rate(config, s) for s in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))
    assert learning_rate(config, 100) == pytest.approx(0.1)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    config = _config(model={**TINY, "dropout": 0.1})
    train(config, tmp_path / "whole", quiet=True, device="cpu")

    train_module = importlib.import_module("sparsa.experiments.train")

    original = train_module._save_checkpoint

    def save_then_die(path, model, optimizer, step, best, cluster):
        original(path, model, optimizer, step, best, cluster)
        raise KeyboardInterrupt("killed after the first checkpoint")

    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "resumed", quiet=True, device="cpu")
    monkeypatch.setattr(train_module, "_save_checkpoint", original)
    assert torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)["step"] == 3
    with pytest.raises(FileExistsError, match="resume"):
        train(config, tmp_path / "resumed", quiet=True, device="cpu")
    with pytest.raises(ValueError, match="steps"):
        train(_config(steps=7), tmp_path / "resumed", resume=True, quiet=True, device="cpu")
    train(config, tmp_path / "resumed", resume=True, quiet=True, device="cpu")
    whole, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    ]
    assert steps == [2, 3, 4, 6, 6]


def test_training_writes_logs_and_selects_a_model(tmp_path):
    model_dir = train(_config(), tmp_path / "run", quiet=True, device="cpu")
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"loss", "token_accuracy", "lr", "tokens_per_second"} <= set(lines[0])
    assert [line["step"] for line in lines if "validation" in line] == [3, 6]
    selection = json.loads((model_dir / "selection.json").read_text())
    assert selection["step"] in (3, 6) and selection["length"] == 10
    assert Transformer.from_pretrained(model_dir).config.scaling == "asentmax"


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path):
    arguments = [
        "train", "--task", "copy", "--task-option", "vocab=6", "--variant", "entmax", "--d-model", "16",
        "--n-layers", "1", "--n-heads", "2", "--min-length", "3", "--max-length", "5", "--steps", "3",
        "--batch-size", "4", "--eval-every", "3", "--checkpoint-every", "3", "--val-examples", "2", "--quiet",
        "--device", "cpu",
    ]  # fmt: skip
    main([*arguments, "--out", str(tmp_path / "single")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "sparsa.cli", *arguments, "--out", str(tmp_path / "ddp")],
        check=True, env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    single, ddp = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], atol=1e-5, rtol=1e-4)
    torch.manual_seed(0)
    initial = Transformer(
        RunConfig.from_dict(json.loads((tmp_path / "single" / "run.json").read_text())).model_config()
    )
    assert not torch.equal(single["embed.weight"], initial.state_dict()["embed.weight"])


def test_exact_match_equals_decoding_every_example(tmp_path):
    config = _config(task="flipflop", task_options={}, min_length=4, max_length=8, steps=40, lr=3e-3)
    model = Transformer.from_pretrained(train(config, tmp_path / "run", quiet=True)).eval()
    for length in (8, 16):
        result = evaluate(model, config.make_task(), length, examples=40, seed=0)
        examples = [sample(config.make_task(), 0, "test", length, i) for i in range(40)]
        decoded = decoded_correctly(model, examples, torch.device("cpu"))
        assert result["exact_match"] == pytest.approx(100.0 * float(decoded.float().mean()))
        assert 0 < result["exact_match"] < 100


def test_classification_tasks_train_and_evaluate(tmp_path):
    config = _config(task="nback", task_options={"vocab": 4, "n": 2}, min_length=6, max_length=8)
    model_dir = train(config, tmp_path / "run", quiet=True)
    result = evaluate(Transformer.from_pretrained(model_dir), config.make_task(), 12, examples=8, seed=0)
    assert set(result) == {"length", "examples", "exact_match", "token_accuracy"}


def test_attention_summary_reports_dispersion(tmp_path):
    model = Transformer(_config().model_config()).eval()
    result = evaluate(model, make_task("copy", vocab=6), 5, examples=4, seed=0, summary_examples=2)
    assert 0 < result["max_weight"] <= 1 and 0 <= result["entropy"] <= 1 and result["support"] >= 1


def _record():
    record = results.new_record("copy", {}, 16)
    for variant, values in (("softmax", (100, 10, 0)), ("asentmax", (100, 90, 40))):
        for seed in (0, 1):
            for length, value in zip((16, 32, 128), values, strict=True):
                record["results"].append(
                    {"variant": variant, "seed": seed, "length": length, "exact_match": value - 2 * seed,
                     "token_accuracy": 99.0, "examples": 10}
                )  # fmt: skip
    return record


def test_results_table_plot_and_report(tmp_path):
    record = _record()
    text = results.table(record)
    assert "| variant | 16 (1x) | 32 (2x) | 128 (8x) |" in text
    assert "| asentmax | 99.0 | 89.0 | 39.0 |" in text
    written = results.report(record, tmp_path)
    assert [p.name for p in written] == ["table.md", "exact_match.png", "token_accuracy.png"]
    assert written[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path = results.write(record, tmp_path / "results.json")
    assert results.load(path) == record
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a sparsa sweep"):
        results.load(tmp_path / "bad.json")


def test_cli_train_eval_sweep_report_and_tasks(tmp_path, capsys):
    small = ["--task-option", "vocab=6", "--d-model", "16", "--n-layers", "1", "--n-heads", "2",
             "--min-length", "3", "--max-length", "4", "--steps", "2", "--batch-size", "2",
             "--val-examples", "2", "--quiet", "--device", "cpu"]  # fmt: skip
    assert main(["train", "--variant", "ssmax", *small, "--out", str(tmp_path / "run")]) == 0
    assert main(["eval", str(tmp_path / "run"), "--lengths", "4", "8", "--examples", "3", "--out",
                 str(tmp_path / "eval")]) == 0  # fmt: skip
    assert len(results.load(tmp_path / "eval" / "results.json")["results"]) == 2
    assert main(["sweep", *small, "--variants", "softmax", "entmax", "--seeds", "0", "1", "--lengths", "4",
                 "--examples", "2", "--out", str(tmp_path / "sweep")]) == 0  # fmt: skip
    record = results.load(tmp_path / "sweep" / "copy" / "results.json")
    assert {(r["variant"], r["seed"]) for r in record["results"]} == {
        ("softmax", 0),
        ("softmax", 1),
        ("entmax", 0),
        ("entmax", 1),
    }
    assert (tmp_path / "sweep" / "copy" / "exact_match.png").exists()
    assert (
        main(["report", str(tmp_path / "sweep" / "copy" / "results.json"), "--out", str(tmp_path / "r")]) == 0
    )
    assert (tmp_path / "r" / "table.md").exists()
    assert main(["tasks", "list"]) == 0
    assert main(["tasks", "export", "mqmtar", "--task-option", "alphabet=16", "--task-option", "n_keys=100",
                 "--task-option", "n_values=100", "--length", "60", "--examples", "3",
                 "--out", str(tmp_path / "x.jsonl")]) == 0  # fmt: skip
    lines = [json.loads(line) for line in (tmp_path / "x.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and lines[0]["text"].startswith("<bos>")
    assert all(label == IGNORE or label >= 0 for label in lines[0]["labels"])
    out = capsys.readouterr().out
    assert "mqmtar" in out and "| softmax |" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--out", "x", "--task", "nosuch"], "unknown task"),
        (["train", "--out", "x", "--task-option", "vocab"], "KEY=VALUE"),
        (["train", "--out", "x", "--min-length", "9", "--max-length", "4"], "min_length"),
    ],
)
def test_cli_errors_name_the_problem(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_every_command_has_help(capsys):
    for command in ("train", "eval", "sweep", "report", "demo", "tasks"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "usage: sparsa" in capsys.readouterr().out


def test_the_demo_evaluates_the_shipped_models(tmp_path, monkeypatch):
    demo = importlib.import_module("sparsa.experiments.demo")
    monkeypatch.setattr(demo, "DEMO_LENGTHS", [16, 32])
    monkeypatch.setattr(demo, "SUMMARY_EXAMPLES", 1)
    record = demo.run_demo(tmp_path, examples=3, device="cpu", quiet=True)
    assert {r["variant"] for r in record["results"]} == {"softmax", "ssmax", "entmax", "asentmax"}
    for variant in ("softmax", "asentmax"):
        shipped = json.loads((demo.SHIPPED / variant / "run.json").read_text())
        assert RunConfig.from_dict(shipped) == dataclasses.replace(demo.demo_config(), variant=variant)
    assert (tmp_path / "results.json").exists() and (tmp_path / "exact_match.png").exists()


def test_the_demo_retrains_with_the_sweep(tmp_path, monkeypatch):
    demo = importlib.import_module("sparsa.experiments.demo")
    tiny = _config(
        task="copy", task_options={"vocab": 64, "distinct": 1}, min_length=8, max_length=16, steps=2
    )
    monkeypatch.setattr(demo, "demo_config", lambda: tiny)
    monkeypatch.setattr(demo, "DEMO_LENGTHS", [16])
    record = demo.run_demo(tmp_path, retrain=True, examples=2, device="cpu", quiet=True)
    assert len(record["results"]) == 4
    assert (tmp_path / "runs" / "asentmax-seed0" / "model" / "model.safetensors").exists()
