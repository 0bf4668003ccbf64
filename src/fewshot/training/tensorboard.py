"""TensorBoard logging of a run's metrics (`fewshot train --tensorboard`): the same scalars as
metrics.jsonl, under RUN_DIR/tensorboard, through torch's SummaryWriter."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fewshot.errors import ConfigError

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

LOG_FOLDER = "tensorboard"
NOT_SCALARS = {"iteration", "split", "metric", "episodes", "inner_steps", "best"}


class TensorBoardLogger:
    """A training-loop listener that writes each metrics record as scalars: "train/loss",
    "train/accuracy", ..., "val/accuracy" (or "val/mse") and "val/ci95", at the record's
    iteration.

    The writer opens at the first record and purges the events from that iteration on, so a
    resumed run does not show twice the iterations it replays after its last checkpoint.
    """

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "--tensorboard needs TensorBoard: pip install 'fewshot[tensorboard]'."
            ) from None
        self._writer_class = SummaryWriter
        self.log_dir = Path(run_dir) / LOG_FOLDER
        self.writer: SummaryWriter | None = None

    def __call__(self, record: dict) -> None:
        step = record["iteration"]
        if self.writer is None:
            self.writer = self._writer_class(str(self.log_dir), purge_step=step)
        prefix = record.get("split", "train")
        for name, value in record.items():
            if name not in NOT_SCALARS and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{prefix}/{name}", value, step)
        if prefix == "val":
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
