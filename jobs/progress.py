"""Every job's progress bar: tqdm, with the count, rate and ETA.

    with Progress(len(todo), "eval", unit="sample") as progress:
        for ...:
            progress.update(1)
            progress.write(f"{sample.id} done")      # a line above the bar, never through it

On a terminal the bar redraws in place on stderr. Elsewhere (job.log, CI, the quickstart reading a job's
output) tqdm's same text is printed as a plain line every `every` seconds and once at the end, so a log holds
a few readable lines instead of carriage returns.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


class _Lines:
    """A file for tqdm that turns each redraw ("\\r" + the bar) into one printed line."""

    def write(self, text: str) -> None:
        text = text.strip("\r\n ")
        if text:
            print(text, flush=True)

    def flush(self) -> None:
        pass


class Progress:
    """A tqdm bar of `total` items (see the module docstring for where it goes)."""

    def __init__(self, total: int, desc: str, *, unit: str = "it", every: float = 10.0, leave: bool = True):
        self.live = sys.stderr.isatty()
        if self.live:
            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=leave)
        else:
            self.bar = tqdm(total=total, desc=desc, unit=unit, file=_Lines(), ncols=90, ascii=True,
                            mininterval=every, maxinterval=every)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def show(self, done: int, total: int) -> None:
        """Set the bar to `done` of `total` (for work counted elsewhere, e.g. in a job's files)."""
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def write(self, line: str) -> None:
        """Print `line` without breaking the bar."""
        if self.live:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
