"""A fit's progress on the driver: one tqdm bar on a terminal, a few plain lines elsewhere.

On a terminal the bar shows epoch, loss, validation accuracy and samples/s. Elsewhere (a log
file, CI, ``ray job submit``) a line is printed every ``ceil(epochs / 4)`` epochs and at the
last one, or every epoch with ``--verbose``, so a job's log stays short but still moves.
"""

from __future__ import annotations

import math
import sys

from raykd import console


class FitProgress:
    def __init__(self, name: str, epochs: int, stream=None):
        self.name, self.epochs = name, epochs
        self.stream = stream or sys.stderr
        self.every = 1 if console.verbose() else max(1, math.ceil(epochs / 4))
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=epochs, desc=f"{name:>9}", unit="epoch", file=self.stream,
                            leave=True, dynamic_ncols=True)

    def update(self, m: dict[str, float]) -> None:
        done = int(m["epoch"]) + 1
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix(loss=f"{m['train_loss']:.4f}", val=f"{m['val_accuracy']:.4f}",
                                 samples_s=f"{m['samples_per_s']:.0f}", refresh=False)
            self.bar.refresh()
            return
        if done % self.every == 0 or done == self.epochs:
            sys.stdout.write(f"[{self.name}] epoch {done}/{self.epochs} "
                             f"loss {m['train_loss']:.4f} val_acc {m['val_accuracy']:.4f} "
                             f"({m['samples_per_s']:.0f} samples/s)\n")
            sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
