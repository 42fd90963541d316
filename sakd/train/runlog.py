"""One small logger for the loop: progress bar, TensorBoard, Weights & Biases.

(The JSON history is the training state's ``history``, written by ``sakd.train.distill`` at the end.)

On a terminal the progress bar shows the loss terms; when standard output (or the bar's standard
error) is not a terminal, the bar gives way to one plain line every ``log_every`` steps, so that a
redirected run writes readable lines instead of thousands of carriage-return updates.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _is_terminal() -> bool:
    return sys.stdout.isatty() and sys.stderr.isatty()


class RunLogger:
    def __init__(self, out: Path, *, log_every: int, total: int, initial: int, progress: bool, main: bool,
                 tensorboard: bool = False, wandb: bool = False, wandb_project: str | None = None, config: dict | None = None,
                 log=print):
        self.log_every, self.total, self.log = log_every, total, log
        self.writer = self.wandb = self.bar = None
        self.plain = False
        if not main:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out / "tb"))
        if wandb:
            import wandb as _wandb  # optional: imported only when asked for
            self.wandb = _wandb
            _wandb.init(project=wandb_project, config=config)
        if progress and _is_terminal():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="distill", unit="step", dynamic_ncols=True)
        else:
            self.plain = progress

    def step(self, rec: dict, terms: dict[str, float]) -> None:
        """Log one optimizer step's record (``terms``: the loss terms shown on the bar or the line)."""
        step, due = rec["step"], rec["step"] % self.log_every == 0
        if self.writer is not None and (due or step == 1):
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(k, v, step)
        if self.wandb is not None and due:
            self.wandb.log(rec, step=step)
        shown = {k: f"{v:.3f}" for k, v in terms.items()} | {"tok/s": f"{rec['tokens_per_s']:.0f}"}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(shown)
        elif self.plain and (due or step == self.total):
            self.log(f"step {step}/{self.total}: " + ", ".join(f"{k} {v}" for k, v in shown.items())
                     + f", lr {rec['lr']:.3g}")

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
