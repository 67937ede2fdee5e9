"""A rich progress bar for training: loss, accuracy, tokens/s and ETA."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainingProgress:
    def __init__(self, total: int, completed: int, *, enabled: bool) -> None:
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  {task.fields[speed]} tok/s"),
            TimeRemainingColumn(),
            disable=not enabled,
        )
        self.task = self.progress.add_task(
            "train", total=total, completed=completed, loss="-", acc="-", speed="-"
        )

    def __enter__(self) -> TrainingProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, record: dict) -> None:
        self.progress.update(
            self.task,
            completed=step,
            loss=f"{record['loss']:.3f}",
            acc=f"{record['token_accuracy']:.1f}%",
            speed=f"{record['tokens_per_second']:.0f}",
        )
