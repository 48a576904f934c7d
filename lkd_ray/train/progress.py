"""What a person watching a run sees: one progress line per run that updates in place, a short line
per epoch, nothing else (full logs go to the run folder)."""
from __future__ import annotations

import sys


def epoch_line(label: str, epoch: int, epochs: int, metrics) -> str:
    m = metrics
    extra = ""
    if "meta_version" in m:
        extra = f"  φ v{int(m['meta_version'])}"
    return (f"{label}: epoch {epoch}/{epochs}  test {m.get('test_top1', float('nan')):.2f}%  quiz {m.get('quiz_top1', float('nan')):.2f}%"
            f"  loss {m.get('train_loss', float('nan')):.3f}  {m.get('epoch_s', 0):.0f}s{extra}")


class _Lines:
    """A bar's printed lines: above the bar while it shows (tqdm keeps it at the bottom), plain lines otherwise."""

    bar = None
    stream = None

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Progress(_Lines):
    """A tqdm bar over all steps of a run, plus one printed line per finished epoch."""

    def __init__(self, label: str, epochs: int, enabled: bool = True, stream=None):
        self.label, self.epochs, self.enabled = label, epochs, enabled
        self.stream = stream or sys.stderr
        self.bar = None
        self._n = 0

    def start(self, total: int, done: int = 0) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=done, desc=self.label, leave=False, dynamic_ncols=True, file=self.stream,
                        mininterval=0.5)

    def step(self, stats: dict) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        self._n += 1
        if self._n % 25 == 0 and stats.get("loss") is not None:  # no loss before the first log sync: show none
            self.bar.set_postfix(loss=f"{stats['loss']:.3f}", refresh=False)

    def epoch(self, rec) -> None:
        if not self.enabled:
            return
        self.write(epoch_line(self.label, rec.epoch, self.epochs, rec.metrics))


class RunBar(_Lines):
    """The driver's bar of a Ray run, fed the steps its workers report. It appears at the first step, counting from
    there: the workers' start-up (minutes on a cold cluster) is not read as slow steps, so no ETA shows until a rate
    is measured; the loss shows once one is logged."""

    def __init__(self, label: str, total: int, enabled: bool = True, stream=None):
        self.label, self.total, self.enabled = label, total, enabled
        self.stream = stream or sys.stderr
        self.bar = None

    def show(self, step: int, loss: float | None) -> None:
        if not self.enabled or step <= 0:
            return
        step = min(step, self.total)
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=step, desc=self.label, leave=False, dynamic_ncols=True,
                            file=self.stream, mininterval=0.5)
        self.bar.n = step
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        self.bar.refresh()
