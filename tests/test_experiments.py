"""Training, resuming, distributed training, evaluation, results and the command line."""

import dataclasses
import importlib
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsa.attention import weight_summary
from sparsa.cli import build_parser, main
from sparsa.experiments import results
from sparsa.experiments.data import training_batch
from sparsa.experiments.evaluate import decoded_correctly, evaluate, observing
from sparsa.experiments.options import resumed_config, run_config
from sparsa.experiments.train import (
    CHECKPOINT,
    MODEL_DIR,
    RunConfig,
    TrainingInterrupted,
    learning_rate,
    recipe,
    train,
)
from sparsa.experiments.variants import RELATED_VARIANTS
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


def _log_steps(run_dir):
    return [json.loads(line)["step"] for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def _stop_at(monkeypatch, step, stop):
    """Call ``stop`` while the batch of 0-based ``step`` is drawn (that is, during step + 1)."""
    train_module = importlib.import_module("sparsa.experiments.train")
    original = train_module.training_batch

    def batch_then_stop(task, seed, at, *args):
        if at == step:
            stop()
        return original(task, seed, at, *args)

    monkeypatch.setattr(train_module, "training_batch", batch_then_stop)
    return lambda: monkeypatch.setattr(train_module, "training_batch", original)


def _kill():
    raise KeyboardInterrupt


TEXT_RUN = {
    "task": "text",
    "task_options": {"passkey_share": 0.5},
    "min_length": 120,
    "max_length": 120,
    "val_length": 120,
}
"""A language-model run whose batches mix corpus windows and passkey documents."""


@pytest.mark.parametrize("task", [{}, TEXT_RUN], ids=["copy", "text"])
def test_a_killed_run_resumes_to_the_weights_and_log_of_an_uninterrupted_one(task, tmp_path, monkeypatch):
    config = _config(model={**TINY, "dropout": 0.1}, **task)
    train(config, tmp_path / "whole", quiet=True, device="cpu")
    restore = _stop_at(monkeypatch, 4, _kill)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config, tmp_path / "resumed", quiet=True, device="cpu")
    restore()
    assert (stopped.value.step, stopped.value.saved_step) == (4, 3)
    assert torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)["step"] == 3
    assert _log_steps(tmp_path / "resumed") == [2, 3, 4]
    with pytest.raises(FileExistsError, match="resume"):
        train(config, tmp_path / "resumed", quiet=True, device="cpu")
    with pytest.raises(ValueError, match="lr"):
        train(_config(lr=0.1), tmp_path / "resumed", resume=True, quiet=True, device="cpu")
    train(config, tmp_path / "resumed", resume=True, quiet=True, device="cpu")
    whole, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert _log_steps(tmp_path / "resumed") == _log_steps(tmp_path / "whole") == [2, 3, 4, 6, 6]


def test_ctrl_c_stops_after_the_running_step_with_a_checkpoint_there(tmp_path, monkeypatch):
    config = _config()
    train(config, tmp_path / "whole", quiet=True, device="cpu")
    # What the process had before (SIG_IGN when it was started in the background), restored after.
    before = signal.getsignal(signal.SIGINT)
    restore = _stop_at(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config, tmp_path / "stopped", quiet=True, device="cpu")
    restore()
    assert (stopped.value.step, stopped.value.saved_step) == (4, 4)
    assert torch.load(tmp_path / "stopped" / CHECKPOINT, weights_only=True)["step"] == 4
    assert signal.getsignal(signal.SIGINT) is before
    train(config, tmp_path / "stopped", resume=True, quiet=True, device="cpu")
    whole, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "stopped")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert _log_steps(tmp_path / "stopped") == _log_steps(tmp_path / "whole")


def test_a_finished_run_is_extended_by_more_steps(tmp_path):
    train(_config(), tmp_path / "run", quiet=True, device="cpu")
    with pytest.raises(ValueError, match="at least 6"):
        train(_config(steps=5), tmp_path / "run", resume=True, quiet=True, device="cpu")
    train(_config(steps=9), tmp_path / "run", resume=True, quiet=True, device="cpu")
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["step"] == 9
    assert RunConfig.load(tmp_path / "run").steps == 9
    assert _log_steps(tmp_path / "run") == [2, 3, 4, 6, 6, 8, 9, 9]


def test_warmup_defaults_to_a_tenth_of_the_steps_and_must_end_before_the_last():
    assert RunConfig(steps=50).warmup_steps == 5
    assert RunConfig(steps=3000).warmup_steps == 300
    with pytest.raises(ValueError, match="never reach its peak"):
        RunConfig(steps=50, warmup_steps=150)
    assert RunConfig(task_options={"vocab": "12"}).task_options == {"vocab": 12}


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


@pytest.mark.parametrize(
    ("task", "options"), [("lookup", {"vocab": 8, "queries": 2}), ("copy", {"vocab": 6})]
)
def test_scores_from_the_kept_logits_equal_those_of_the_full_forward(task, options, tmp_path):
    """evaluate() asks the model for the logits of the labelled positions only."""
    config = _config(task=task, task_options=options, min_length=4, max_length=8, steps=60, lr=3e-3)
    model = Transformer.from_pretrained(train(config, tmp_path / "run", quiet=True)).eval()
    examples = [sample(config.make_task(), 0, "test", 12, i) for i in range(30)]
    correct = labelled = exact = 0
    with torch.no_grad():
        for e in examples:
            predicted = model(torch.from_numpy(e.tokens)[None])[0].argmax(-1).numpy()
            where = e.labels >= 0
            correct += int((predicted[where] == e.labels[where]).sum())
            labelled += int(where.sum())
            exact += bool((predicted[where] == e.labels[where]).all())
    result = evaluate(model, config.make_task(), 12, examples=30, seed=0)
    assert result["token_accuracy"] == pytest.approx(100.0 * correct / labelled)
    if task == "lookup":
        assert result["exact_match"] == pytest.approx(100.0 * exact / 30)


def test_classification_tasks_train_and_evaluate(tmp_path):
    config = _config(task="nback", task_options={"vocab": 4, "n": 2}, min_length=6, max_length=8)
    model_dir = train(config, tmp_path / "run", quiet=True)
    result = evaluate(Transformer.from_pretrained(model_dir), config.make_task(), 12, examples=8, seed=0)
    assert set(result) == {"length", "examples", "exact_match", "token_accuracy"}


@pytest.mark.parametrize("variant", RELATED_VARIANTS)
def test_every_related_variant_trains_and_evaluates_with_its_statistics(variant, tmp_path):
    config = _config(variant=variant, steps=2, eval_every=2, checkpoint_every=2, warmup_steps=0)
    train(config, tmp_path / variant, quiet=True, device="cpu")
    model = Transformer.from_pretrained(tmp_path / variant / "model")
    assert model.config.to_dict() == config.model_config().to_dict()
    row = evaluate(model, config.make_task(), 6, examples=3, seed=0, summary_examples=2)
    assert all(math.isfinite(row[name]) for name in ("token_accuracy", "max_weight", "entropy", "support"))


def test_attention_summary_reports_dispersion(tmp_path):
    model = Transformer(_config().model_config()).eval()
    result = evaluate(model, make_task("copy", vocab=6), 5, examples=4, seed=0, summary_examples=2)
    assert 0 < result["max_weight"] <= 1 and 0 <= result["entropy"] <= 1 and result["support"] >= 1


def test_the_attention_summary_of_a_nape_model_is_also_given_per_head_type():
    """Half the heads are ALiBi, half NoPE: the summary over all heads is the mean of the two."""
    lookup = {"task": "lookup", "task_options": {"vocab": 8, "queries": 2}}
    config = _config(model={**_config().model, "positions": "nape"}, **lookup).model_config()
    torch.manual_seed(0)
    model = Transformer(config).eval()
    result = evaluate(
        model, make_task("lookup", vocab=8, queries=2), 20, examples=2, seed=0, summary_examples=2
    )
    for metric in ("max_weight", "entropy", "support"):
        halves = (result[f"{metric}_alibi"] + result[f"{metric}_nope"]) / 2
        assert result[metric] == pytest.approx(halves)
    assert result["support_alibi"] != pytest.approx(result["support_nope"])
    # The rows summarised are those that predict an answer: for lookup, the queries after <sep>.
    example = sample(make_task("lookup", vocab=8, queries=2), 0, "test", 20, 0)
    seen = []
    with observing(
        model, lambda q, k, **options: seen.append(weight_summary(q, k, first_query=22, **options))
    ):
        model(torch.from_numpy(example.tokens)[None])
    by_hand = sum(float(s.support.mean()) for s in seen) / len(seen)
    one = evaluate(model, make_task("lookup", vocab=8, queries=2), 20, examples=1, seed=0, summary_examples=1)
    assert one["support"] == pytest.approx(by_hand)
    rope = Transformer(_config(model={**_config().model, "positions": "rope"}).model_config()).eval()
    plain = evaluate(rope, make_task("copy", vocab=6), 5, examples=2, seed=0, summary_examples=1)
    assert "max_weight_alibi" not in plain and "max_weight" in plain


def _record():
    record = results.new_record("copy", {}, 16, min_train_length=8)
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


def test_a_table_whose_rows_have_different_seeds_names_each_row_s_count():
    record = _record()
    record["results"] = [r for r in record["results"] if r["variant"] != "softmax" or r["seed"] == 0]
    text = results.table(record)
    assert "| softmax (1 seed) |" in text and "| asentmax (2 seeds) |" in text
    assert "| asentmax |" in results.table(_record())


def test_a_figure_whose_variants_have_different_seeds_says_so_and_names_each_count(tmp_path, monkeypatch):
    record = _record()
    record["results"] = [r for r in record["results"] if r["variant"] != "softmax" or r["seed"] == 0]
    note = results.sample_note(record, "exact_match")
    assert note.startswith("mean of 1-2 seeds per variant (of 0, 1; each variant's count beside its name)")
    assert results.variant_names(record, "exact_match") == {
        "softmax": "softmax (1 seed)",
        "asentmax": "asentmax (2 seeds)",
    }
    import matplotlib.axes

    labels = []
    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "plot",
        lambda self, *a, **k: labels.append(k.get("label")) or original(self, *a, **k),
    )
    results.plot(record, tmp_path / "p.png")
    assert labels == ["softmax (1 seed)", "asentmax (2 seeds)"]


def _split(record):
    """The record's softmax rows and its asentmax rows as two records of the same experiment."""
    parts = []
    for variant in ("softmax", "asentmax"):
        part = {**record, "results": [r for r in record["results"] if r["variant"] == variant]}
        parts.append(part)
    return parts


def test_merged_sweeps_are_the_sweep_they_were_split_from():
    record = _record()
    assert results.merge(_split(record), ["a", "b"]) == record


def test_merge_refuses_other_experiments_and_cells_held_twice():
    first, second = _split(_record())
    other = {**second, "task_options": {"vocab": 32}}
    with pytest.raises(ValueError, match=r"cannot merge b with a: task_options differs \(\{'vocab': 32\}"):
        results.merge([first, other], ["a", "b"])
    with pytest.raises(ValueError, match="cannot merge c with a: both hold variant softmax seed 0 length 16"):
        results.merge([first, second, first], ["a", "b", "c"])


def test_cli_report_merge_writes_one_record_and_one_report(tmp_path, capsys):
    paths = []
    for name, part in zip(("one", "two"), _split(_record()), strict=True):
        paths.append(str(results.write(part, tmp_path / name / "results.json")))
    out = tmp_path / "merged"
    assert main(["report", *paths, "--merge", "--out", str(out)]) == 0
    assert results.load(out / "results.json") == _record()
    table = (out / "table.md").read_text()
    assert "| softmax |" in table and "| asentmax |" in table
    assert main(["report", *paths, "--merge"]) == 2
    assert "sparsa report: --merge needs --out" in capsys.readouterr().err


def test_figures_and_tables_say_how_many_seeds_and_examples_each_point_is(tmp_path):
    record = _record()
    assert results.training_lengths(record) == (8, 16)
    assert "exact match (%): mean of 2 seeds (0, 1), 10 examples per length and seed." in results.table(
        record
    )
    for row in record["results"]:
        row.update(support=3.0, summary_examples=4)
    note = results.sample_note(record, "support")
    assert (
        note
        == "mean of 2 seeds (0, 1), 4 examples (their answer rows, over layers and heads) per length and seed"
    )
    assert "support.png" in [p.name for p in results.report(record, tmp_path)]
    del record["min_train_length"]
    assert results.training_lengths(record) == (16, 16)
    assert "# copy (trained on length 16)" in (results.report(record, tmp_path)[0]).read_text()


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
    runs = results.record_runs(record, tmp_path / "sweep" / "copy")
    assert sorted(runs) == ["entmax-seed0", "entmax-seed1", "softmax-seed0", "softmax-seed1"]
    assert [h["step"] for h in results.validation_history(runs["entmax-seed1"])] == [2]
    for folder in ("sweep/copy", "r"):  # the report finds the runs beside the results it reads
        assert (tmp_path / folder / "learning_curves.png").exists()
    assert main(["tasks", "list"]) == 0
    assert main(["tasks", "export", "mqmtar", "--task-option", "alphabet=16", "--task-option", "n_keys=100",
                 "--task-option", "n_values=100", "--length", "60", "--examples", "3",
                 "--out", str(tmp_path / "x.jsonl")]) == 0  # fmt: skip
    lines = [json.loads(line) for line in (tmp_path / "x.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and lines[0]["text"].startswith("<bos>")
    assert all(label == IGNORE or label >= 0 for label in lines[0]["labels"])
    out = capsys.readouterr().out
    assert "mqmtar" in out and "| softmax |" in out


SMALL_RUN = ["--task-option", "vocab=6", "--d-model", "16", "--n-layers", "1", "--n-heads", "2",
             "--min-length", "3", "--max-length", "4", "--batch-size", "2", "--val-examples", "2",
             "--eval-every", "3", "--checkpoint-every", "3", "--log-every", "2", "--quiet",
             "--device", "cpu"]  # fmt: skip


def test_a_row_option_reaches_the_trained_model(tmp_path):
    run = tmp_path / "run"
    argv = ["train", *SMALL_RUN, "--steps", "1", "--variant", "stick-breaking", "--row-option", "current=0"]
    assert main([*argv, "--out", str(run)]) == 0
    model = Transformer.from_pretrained(run / MODEL_DIR)
    assert model.config.row_map == "stick-breaking" and model.config.row_options == {"current": 0.0}


def test_a_window_reaches_the_trained_model(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *SMALL_RUN, "--steps", "1", "--window", "3", "--out", str(run)]) == 0
    model = Transformer.from_pretrained(run / MODEL_DIR)
    assert model.config.window == 3 and model.blocks[0].attention.window == 3


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *SMALL_RUN, "--steps", "6", "--out", str(run)]) == 0
    return run


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--out", "x", "--task", "nosuch"], "unknown task"),
        (["train", "--out", "x", "--task-option", "vocab"], "KEY=VALUE"),
        (["train", "--out", "x", "--min-length", "9", "--max-length", "4"], "min_length"),
        (["train", "--out", "x", "--task-option", "vocab=abc"], "option vocab takes an integer, got 'abc'"),
        (["train", "--out", "x", "--steps", "50", "--warmup-steps", "150"], "warmup_steps"),
        (["train", "--out", "x", "--steps", "0"], "argument --steps: must be at least 1, got 0"),
        (["train", "--out", "nosuch", "--resume"], "no run in nosuch"),
        (["eval", "{run}", "--examples", "0"], "argument --examples: must be at least 1, got 0"),
        (["eval", "{run}", "--examples", "-3"], "argument --examples: must be at least 1, got -3"),
        (["eval", "{run}", "--lengths", "4", "y"], "argument --lengths: expected an integer, got 'y'"),
        (["tasks", "export", "copy", "--length", "-4", "--out", "x"], "argument --length: must be at least"),
        (["tasks", "export", "copy", "--length", "4", "--examples", "0", "--out", "x"], "--examples"),
        (["tasks", "export", "copy", "--task-option", "distinct=1", "--task-option", "vocab=3",
          "--length", "4", "--out", "x"], "sparsa tasks export: copy: distinct symbols need length <= vocab"),
        (["report", "{run}/nosuch.json"], "no results file"),
        (["report", "{run}/run.json"], "not a sparsa sweep result"),
        (["train", "--out", "{run}", "--resume", "--lr", "0.5"], "differ from the run's: ['lr']"),
        (["eval", "{run}", "--device", "gpu"], "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        (["train", "--out", "x", "--variant", "topk-softmax", "--row-option", "k=abc"],
         "--row-option k takes a number, got 'abc'"),
        (["train", "--out", "x", "--variant", "topk-softmax", "--row-option", "k=0"],
         "option k must be a whole number of keys >= 1, got 0.0"),
        (["train", "--out", "x", "--variant", "topk-softmax", "--row-option", "tau=1"],
         "takes options ['k']"),
        (["train", "--out", "x", "--variant", "stick-breaking", "--row-option", "current=2"],
         "option current must be 0 or 1"),
        (["train", "--out", "x", "--variant", "softmax", "--row-option", "k=2"], "need a row_map"),
    ],
)  # fmt: skip
def test_cli_errors_are_one_line_that_names_the_problem(argv, message, finished_run, capsys, tmp_path):
    argv = [a.format(run=finished_run) for a in argv]
    argv = [str(tmp_path / a) if a in ("x", "nosuch") else a for a in argv]
    message = message.replace("nosuch", str(tmp_path / "nosuch"))
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1, error
    assert message in error
    assert not (tmp_path / "x").exists()


def _parsed(*argv):
    return build_parser().parse_args(["train", "--out", "x", *argv])


def test_a_variant_that_names_positions_overrides_the_preset_but_not_an_option():
    assert (
        run_config(_parsed("--preset", "lm-cpu", "--variant", "softmax-rope")).model_config().positions
        == "rope"
    )
    assert run_config(_parsed("--preset", "lm-cpu")).model_config().positions == "nape"
    typed = run_config(_parsed("--variant", "softmax-rope", "--positions", "alibi"))
    assert typed.model_config().positions == "alibi"
    base = run_config(_parsed("--preset", "lm-cpu"))
    swept = dataclasses.replace(base, variant="softmax-rope").model_config()
    assert (swept.positions, swept.alpha, swept.d_model, swept.n_layers) == ("rope", 1.0, 128, 4)


def test_a_run_resumed_with_its_preset_keeps_its_settings_and_refuses_another():
    saved = run_config(_parsed("--preset", "lm-cpu", "--task", "text", "--variant", "softmax-rope"))
    again = _parsed("--preset", "lm-cpu", "--resume")
    assert resumed_config(again, saved) == saved
    with pytest.raises(ValueError, match="preset_model"):
        resumed_config(_parsed("--preset", "lm-gpu", "--resume"), saved)


def test_cli_resumes_from_the_run_folder_alone_and_extends_a_finished_run(tmp_path, capsys, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert "is finished: it trained all 6 steps" in capsys.readouterr().out
    assert main(["train", "--out", str(run), "--resume", "--steps", "8", "--quiet"]) == 0
    assert RunConfig.load(run) == dataclasses.replace(RunConfig.load(finished_run), steps=8)
    assert torch.load(run / CHECKPOINT, weights_only=True)["step"] == 8


def test_cli_ctrl_c_says_where_the_checkpoint_is_and_how_to_resume(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    restore = _stop_at(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGINT))
    assert main(["train", *SMALL_RUN, "--steps", "6", "--out", str(run)]) == 130
    restore()
    error = capsys.readouterr().err
    assert error.strip() == (
        f"sparsa train: stopped after step 4; {run / CHECKPOINT} holds step 4. "
        f"Continue with sparsa train --out {run} --resume."
    )
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
    assert torch.load(run / CHECKPOINT, weights_only=True)["step"] == 6


def test_a_stopped_sweep_continues_with_the_same_command(tmp_path, capsys, monkeypatch):
    argv = ["sweep", *SMALL_RUN, "--steps", "6", "--variants", "entmax", "--lengths", "4", "--examples", "2",
            "--out", str(tmp_path / "sweep")]  # fmt: skip
    restore = _stop_at(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGINT))
    assert main(argv) == 130
    restore()
    assert capsys.readouterr().err.strip().endswith("holds step 4. Continue with the same command.")
    assert main(argv) == 0
    record = results.load(tmp_path / "sweep" / "copy" / "results.json")
    assert [(r["variant"], r["length"]) for r in record["results"]] == [("entmax", 4)]


def test_a_sweep_refuses_a_folder_made_with_other_settings_and_its_record_refuses_to_merge(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = [
        "sweep",
        *SMALL_RUN,
        "--variants",
        "entmax",
        "--lengths",
        "4",
        "--examples",
        "2",
        "--out",
        str(out),
    ]
    assert main([*argv, "--steps", "2"]) == 0
    record = results.load(out / "copy" / "results.json")
    saved = RunConfig.load(out / "copy" / "runs" / "entmax-seed0")
    assert record["recipe"] == recipe(saved) and record["recipe"]["steps"] == 2
    capsys.readouterr()
    assert main([*argv, "--steps", "3"]) == 2
    refused = "was made with other settings than this sweep's"
    assert (
        f"sparsa sweep: {out / 'copy' / 'results.json'} {refused} (steps differ)" in capsys.readouterr().err
    )
    (out / "copy" / "results.json").unlink()
    assert main([*argv, "--steps", "3", "--lr", "0.01"]) == 2
    assert f"{out / 'copy' / 'runs' / 'entmax-seed0'} {refused} (lr, steps differ)" in capsys.readouterr().err
    other = {**record, "recipe": {**record["recipe"], "lr": 0.5}}
    with pytest.raises(ValueError, match=r"cannot merge b with a: its settings differ: lr$"):
        results.merge([record, other], ["a", "b"])
    with pytest.raises(ValueError, match="cannot merge b with a: recipe differs"):
        results.merge([record, {**record, "recipe": None}], ["a", "b"])


def test_a_failed_export_leaves_no_file_behind(tmp_path, monkeypatch, capsys):
    import sparsa.tasks

    original = sparsa.tasks.sample

    def fail_at_second(task, seed, split, length, index):
        if index == 1:
            raise ValueError("disk full")
        return original(task, seed, split, length, index)

    monkeypatch.setattr(sparsa.tasks, "sample", fail_at_second)
    out = tmp_path / "x.jsonl"
    assert main(["tasks", "export", "copy", "--length", "4", "--examples", "3", "--out", str(out)]) == 2
    assert "disk full" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_report_of_several_results_writes_each_to_its_own_folder(tmp_path, capsys):
    first, second = _record(), _record()
    second["task"] = "reverse"
    results.write(first, tmp_path / "copy" / "results.json")
    results.write(second, tmp_path / "other" / "copy" / "results.json")
    out = tmp_path / "report"
    paths = [str(tmp_path / "copy" / "results.json"), str(tmp_path / "other" / "copy" / "results.json")]
    assert main(["report", *paths, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["copy", "copy-2"]
    assert "# copy " in (out / "copy" / "table.md").read_text()
    assert "# reverse " in (out / "copy-2" / "table.md").read_text()


def test_every_command_has_help(capsys):
    for command in ("train", "eval", "sweep", "report", "demo", "tasks"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "usage: sparsa" in capsys.readouterr().out


def test_the_demo_evaluates_the_shipped_models(tmp_path, monkeypatch):
    demo = importlib.import_module("sparsa.experiments.demo")
    short = {name: dataclasses.replace(d, lengths=d.lengths[:2]) for name, d in demo.DEMO_TASKS.items()}
    monkeypatch.setattr(demo, "DEMO_TASKS", short)
    monkeypatch.setattr(demo, "SUMMARY_EXAMPLES", 1)
    records = demo.run_demo(tmp_path, examples=3, device="cpu", quiet=True)
    assert set(records) == {"copy", "lookup"}
    for task in (short["copy"], short["lookup"]):
        record = records[task.name]
        assert {r["variant"] for r in record["results"]} == {"softmax", "ssmax", "entmax", "asentmax"}
        for variant in ("softmax", "asentmax"):
            shipped = json.loads((demo.SHIPPED / task.name / variant / "run.json").read_text())
            assert RunConfig.from_dict(shipped) == dataclasses.replace(task.config(), variant=variant)
        assert (tmp_path / task.name / "results.json").exists()
        assert (tmp_path / task.name / "exact_match.png").exists()


def test_the_text_demo_evaluates_the_shipped_language_models(tmp_path, monkeypatch):
    demo = importlib.import_module("sparsa.experiments.demo")
    text = dataclasses.replace(demo.DEMO_TASKS["text"], lengths=(256, 512))
    monkeypatch.setattr(demo, "DEMO_TASKS", {**demo.DEMO_TASKS, "text": text})
    record = demo.run_demo(tmp_path, tasks=("text",), examples=2, device="cpu", quiet=True)["text"]
    variants = ("softmax-rope", "softmax", "ssmax", "entmax", "asentmax")
    assert {r["variant"] for r in record["results"]} == set(variants)
    assert record["corpus"]["source"] == "stdlib"
    for variant in variants:
        folder = demo.SHIPPED / "text" / variant
        assert (folder / "model.safetensors").stat().st_size < 2_000_000
        shipped = RunConfig.from_dict(json.loads((folder / "run.json").read_text()))
        assert shipped == dataclasses.replace(text.config(), variant=variant)
    assert Transformer.from_pretrained(demo.SHIPPED / "text" / "softmax-rope").config.positions == "rope"
    for name in ("table.md", "bits_by_position.png", "passkey.png", "bits_per_byte.png"):
        assert (tmp_path / "text" / name).exists()
    with pytest.raises(ValueError, match="unknown demo tasks"):
        demo.run_demo(tmp_path, tasks=("nosuch",))


def test_the_demo_retrains_with_the_sweep(tmp_path, monkeypatch):
    demo = importlib.import_module("sparsa.experiments.demo")
    short = {
        name: dataclasses.replace(d, lengths=(16,), training={**d.training, "steps": 3})
        for name, d in demo.DEMO_TASKS.items()
    }
    monkeypatch.setattr(demo, "DEMO_TASKS", short)
    records = demo.run_demo(tmp_path, retrain=True, examples=2, device="cpu", quiet=True)
    assert [len(records[t]["results"]) for t in ("copy", "lookup")] == [4, 4]
    for task in ("copy", "lookup"):
        assert (tmp_path / task / "runs" / "asentmax-seed0" / "model" / "model.safetensors").exists()
