"""The ``sparsa`` command: demo, train, eval, sweep, report, tasks and bench."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._version import __version__


class _Parser(argparse.ArgumentParser):
    """A usage mistake gets one line that names the argument, not the whole usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .experiments.demo import DEFAULT_DEMO_TASKS, DEMO_TASKS
    from .experiments.options import add_run_options, non_negative_int, positive_int
    from .experiments.variants import DEMO_VARIANTS, VARIANTS

    parser = _Parser(prog="sparsa", description="Sparse, length-robust attention for PyTorch.")
    parser.add_argument("--version", action="version", version=f"sparsa {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="length generalization of softmax, SSMax, 1.5-entmax and ASEntmax (CPU, minutes)",
        description="Evaluate the shipped softmax, SSMax, 1.5-entmax and ASEntmax models (all with NAPE) "
        "on copy, from 1x to 64x their training length, and on lookup, from 1x to 256x; with --tasks text, "
        "the byte-level language models (those four and softmax with RoPE) by bits per byte and passkey "
        "retrieval from 1x to 8x their 256-byte context. Writes results.json, tables and plots to "
        "--out/<task>.",
    )
    demo.add_argument("--out", default="results/demo", help="output folder; default results/demo")
    demo.add_argument(
        "--tasks",
        nargs="+",
        default=list(DEFAULT_DEMO_TASKS),
        choices=list(DEMO_TASKS),
        metavar="TASK",
        help=f"demo tasks; default {' '.join(DEFAULT_DEMO_TASKS)}; known: {', '.join(DEMO_TASKS)}",
    )
    demo.add_argument(
        "--retrain",
        action="store_true",
        help="train the models from scratch instead of loading the shipped ones",
    )
    demo.add_argument(
        "--examples", type=positive_int, default=None, help="examples per length (default: the demo's)"
    )
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda")
    demo.add_argument("--quiet", action="store_true", help="no progress output")
    demo.set_defaults(run=_demo)

    train = commands.add_parser(
        "train",
        help="train one model on a task (resumable, torchrun-ready)",
        description="Train a decoder-only model on a synthetic task. Writes run.json, log.jsonl, "
        "checkpoint.pt and the best model on the validation length to OUT/model. Ctrl-C stops after "
        "the running step and writes a checkpoint; `sparsa train --out OUT --resume` continues it "
        "with the settings in OUT/run.json. Under `torchrun --nproc_per_node N` the same command "
        "trains with DistributedDataParallel on the same global batch.",
    )
    add_run_options(train)
    train.add_argument("--out", required=True, help="run folder")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint, with its saved settings; "
        "--steps larger than the run's extends it",
    )
    train.set_defaults(run=_train)

    evaluate = commands.add_parser(
        "eval",
        help="exact match of a trained model at several lengths",
        description="Evaluate a model folder (a run folder or its model/) by greedy decoding at each length.",
    )
    evaluate.add_argument("model", help="run folder (with run.json) or model folder")
    evaluate.add_argument(
        "--lengths", type=positive_int, nargs="+", default=None, help="default: 1x..64x training length"
    )
    evaluate.add_argument(
        "--examples", type=positive_int, default=100, help="examples per length; default 100"
    )
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the test examples")
    evaluate.add_argument(
        "--summary-examples", type=non_negative_int, default=4, help="examples for the attention statistics"
    )
    evaluate.add_argument("--out", default=None, help="write results.json, table.md and plots here")
    evaluate.add_argument("--device", default="auto", help="auto, cpu or cuda")
    evaluate.set_defaults(run=_eval)

    sweep = commands.add_parser(
        "sweep",
        help="train and evaluate variants x seeds x tasks",
        description="For each task, variant and seed: train (resuming unfinished runs), evaluate at "
        "every length, and write OUT/<task>/results.json, table.md and plots.",
    )
    add_run_options(sweep, variant=False)
    sweep.add_argument("--tasks", nargs="+", default=None, help="tasks (default: --task)")
    sweep.add_argument(
        "--variants",
        nargs="+",
        default=list(DEMO_VARIANTS),
        choices=list(VARIANTS),
        metavar="VARIANT",
        help=f"variants; default {' '.join(DEMO_VARIANTS)}; known: {', '.join(VARIANTS)}",
    )
    sweep.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; default 0")
    sweep.add_argument(
        "--lengths", type=positive_int, nargs="+", default=None, help="default: 1x..64x training length"
    )
    sweep.add_argument(
        "--examples", type=positive_int, default=100, help="test examples per length; default 100"
    )
    sweep.add_argument(
        "--summary-examples", type=non_negative_int, default=4, help="examples for the attention statistics"
    )
    sweep.add_argument("--out", required=True, help="sweep folder")
    sweep.set_defaults(run=_sweep)

    report = commands.add_parser("report", help="tables and plots from results.json files")
    report.add_argument("results", nargs="+", help="results.json files of sweeps")
    report.add_argument(
        "--out",
        default=None,
        help="output folder (default: beside each results file); with several results files, "
        "each gets a subfolder named after the folder that holds it",
    )
    report.add_argument(
        "--merge",
        action="store_true",
        help="one report of several results files of the same experiment (sweeps run apart); "
        "also writes the merged results.json to --out",
    )
    report.set_defaults(run=_report)

    tasks = commands.add_parser("tasks", help="list the tasks or export examples to a JSONL file")
    task_commands = tasks.add_subparsers(dest="tasks_command", metavar="ACTION", required=True)
    task_commands.add_parser("list", help="tasks with their parameters and defaults").set_defaults(
        run=_tasks_list
    )
    export = task_commands.add_parser("export", help="write examples as JSON lines (token ids and names)")
    export.add_argument("task", help="task name")
    export.add_argument(
        "--task-option", action="append", default=[], metavar="KEY=VALUE", help="task parameter"
    )
    export.add_argument("--length", type=positive_int, required=True, help="task length")
    export.add_argument("--examples", type=positive_int, default=100, help="number of examples; default 100")
    export.add_argument("--seed", type=int, default=0, help="seed")
    export.add_argument(
        "--split", default="test", choices=["train", "validation", "test", "export"], help="split"
    )
    export.add_argument("--out", required=True, help="JSONL file")
    export.set_defaults(run=_tasks_export)

    bench = commands.add_parser("bench", help="run a benchmark (prints a table, writes JSON)")
    benchmarks = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    from .benchmarks import attention as attention_bench
    from .benchmarks import decode as decode_bench
    from .benchmarks import gpu as gpu_bench
    from .benchmarks import hf as hf_bench
    from .benchmarks import kernels as kernels_bench
    from .benchmarks import normalizers as normalizer_bench

    normalizers = benchmarks.add_parser(
        "normalizers", help="softmax, sparsemax and entmax against torch.softmax and the entmax package"
    )
    normalizer_bench.add_arguments(normalizers)
    normalizers.set_defaults(run=normalizer_bench.run_from_args)
    attention = benchmarks.add_parser(
        "attention", help="blocked 1.5-entmax attention against torch SDPA and a dense entmax pipeline"
    )
    attention_bench.add_arguments(attention)
    attention.set_defaults(run=attention_bench.run_from_args)
    gpu = benchmarks.add_parser(
        "gpu", help="the Triton backend on a GPU: correctness, then time against torch SDPA and adasplash"
    )
    gpu_bench.add_arguments(gpu)
    gpu.set_defaults(run=gpu_bench.run_from_args)
    decode = benchmarks.add_parser(
        "decode",
        help="one decode step over a paged KV cache against SDPA, the dense decode and the bandwidth floor",
    )
    decode_bench.add_arguments(decode)
    decode.set_defaults(run=decode_bench.run_from_args)
    kernels = benchmarks.add_parser(
        "kernels", help="registers and spills of the Triton kernels per tile size, compiled without a GPU"
    )
    kernels_bench.add_arguments(kernels)
    kernels.set_defaults(run=kernels_bench.run_from_args)
    hf = benchmarks.add_parser(
        "hf",
        help="every causal-LM architecture of transformers: converted at alpha 1 and compared, or refused",
    )
    hf_bench.add_arguments(hf)
    hf.set_defaults(run=hf_bench.run_from_args)
    return parser


def _train(args: argparse.Namespace) -> int:
    from .experiments.options import resumed_config, run_config
    from .experiments.train import RunConfig, train, trained_steps

    out = Path(args.out)
    if args.resume:
        config = resumed_config(args, RunConfig.load(out))
        done = trained_steps(out)
        if done >= config.steps:
            print(
                f"{out} is finished: it trained all {done} steps. "
                f"To train it further, resume with --steps larger than {done}."
            )
            return 0
    else:
        config = run_config(args)
    model_dir = train(config, out, resume=args.resume, device=args.device, quiet=args.quiet)
    print(f"best model on validation: {model_dir}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .experiments.results import new_record, report, write
    from .experiments.sweep import default_lengths, evaluate_into
    from .experiments.train import MODEL_DIR, RUN_FILE, RunConfig

    folder = Path(args.model)
    run_folder = folder if (folder / RUN_FILE).exists() else folder.parent
    if not (run_folder / RUN_FILE).exists():
        raise FileNotFoundError(f"no {RUN_FILE} in {folder} or its parent: cannot tell the task")
    config = RunConfig.load(run_folder)
    model_dir = folder / MODEL_DIR if (folder / MODEL_DIR).exists() else folder
    record = new_record(
        config.task, config.task_options, config.max_length, min_train_length=config.min_length
    )
    out = Path(args.out) if args.out else None
    evaluate_into(
        record,
        out / "results.json" if out else None,
        model_dir,
        config.make_task(),
        config.variant,
        args.seed,
        args.lengths or default_lengths(config.max_length),
        examples=args.examples,
        summary_examples=args.summary_examples,
        device=args.device,
        quiet=False,
    )
    if out:
        write(record, out / "results.json")
        report(record, out)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .experiments.options import run_config
    from .experiments.results import table
    from .experiments.sweep import sweep

    for task in args.tasks or [args.task or "copy"]:
        args.task = task
        base = run_config(args, variant=args.variants[0], seed=args.seeds[0])
        record = sweep(
            base,
            args.variants,
            args.seeds,
            Path(args.out) / task,
            lengths=args.lengths,
            examples=args.examples,
            summary_examples=args.summary_examples,
            device=args.device,
            preset=args.preset or "demo",
            quiet=args.quiet,
        )
        print(table(record))
    return 0


def _report(args: argparse.Namespace) -> int:
    from .experiments.results import load, merge, report, table, write

    paths = [Path(p) for p in args.results]
    if args.merge:
        if args.out is None:
            raise ValueError("--merge needs --out, the folder for the merged results and report")
        merged = merge([load(p) for p in paths], [str(p) for p in paths])
        print(f"wrote {write(merged, Path(args.out) / 'results.json')}")
        reports = [(merged, Path(args.out), None)]
    else:
        folders = _report_folders(paths, args.out)
        reports = [(load(p), f, p.parent) for p, f in zip(paths, folders, strict=True)]
    for record, folder, runs_folder in reports:
        written = report(record, folder, runs_folder)
        print(table(record))
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _report_folders(paths: list[Path], out: str | None) -> list[Path]:
    """Where each report goes: beside its results, in ``out``, or (several results) a subfolder each."""
    if out is None:
        return [p.parent for p in paths]
    if len(paths) == 1:
        return [Path(out)]
    folders, taken = [], set()
    for path in paths:
        name = path.resolve().parent.name or "results"
        unique, count = name, 1
        while unique in taken:
            count += 1
            unique = f"{name}-{count}"
        taken.add(unique)
        folders.append(Path(out) / unique)
    return folders


def _tasks_list(args: argparse.Namespace) -> int:
    from .tasks import TASKS, make_task

    for name, cls in sorted(TASKS.items()):
        task = make_task(name)
        options = ", ".join(f"{k}={v}" for k, v in task.parameters().items())
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:12} {task.kind:9} {options}\n{'':22}{doc}")
    return 0


def _tasks_export(args: argparse.Namespace) -> int:
    from .experiments.options import parse_task_options
    from .tasks import make_task, sample

    task = make_task(args.task, **parse_task_options(args.task_option))
    task.check_length(args.length)
    names = task.token_names()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        with partial.open("w") as file:
            for index in range(args.examples):
                e = sample(task, args.seed, args.split, args.length, index)
                line = {
                    "tokens": e.tokens.tolist(),
                    "labels": e.labels.tolist(),
                    "prompt_length": e.prompt,
                    "text": " ".join(names[t] for t in e.tokens),
                }
                file.write(json.dumps(line) + "\n")
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    print(f"wrote {args.examples} examples of {args.task} at length {args.length} to {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .experiments.demo import run_demo

    run_demo(
        args.out,
        tasks=tuple(args.tasks),
        retrain=args.retrain,
        examples=args.examples,
        device=args.device,
        quiet=args.quiet,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .experiments.train import TrainingInterrupted

    command = " ".join(c for c in (args.command, getattr(args, "tasks_command", None)) if c)
    try:
        return args.run(args)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"sparsa {command}: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stopped:
        print(_interrupted_message(args.command, stopped), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"sparsa {command}: interrupted", file=sys.stderr)
        return 130


def _interrupted_message(command: str, stopped) -> str:
    from .experiments.train import CHECKPOINT

    if stopped.saved_step is None:
        saved = "no checkpoint was written yet, so it starts again from step 0"
    else:
        saved = f"{stopped.out / CHECKPOINT} holds step {stopped.saved_step}"
    # A sweep (and the demo's retraining) resumes its unfinished runs when run again.
    again = f"sparsa train --out {stopped.out} --resume" if command == "train" else "the same command"
    return f"sparsa {command}: stopped after step {stopped.step}; {saved}. Continue with {again}."


if __name__ == "__main__":
    sys.exit(main())
