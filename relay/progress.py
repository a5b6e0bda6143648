"""Progress of a long command (``dlq replay``/``purge``, ``backfill``) on stderr.

On a terminal, a tqdm progress bar (a counter with a rate when the total is unknown);
otherwise — a pipe, a file, a CI log — one plain line at most every ``interval``
seconds, and always a last one, so logs stay readable and grep-able.
"""

from __future__ import annotations

import time
from typing import Never, TextIO

from tqdm import tqdm


class Meter:
    def __init__(
        self,
        stream: TextIO,
        label: str,
        *,
        unit: str = "it",
        total: int | None = None,
        interval: float = 1.0,
    ) -> None:
        self._stream = stream
        self._label = label
        self._unit = unit
        self._interval = interval
        self._last = float("-inf")
        self._done = 0
        self._total = total
        self._detail = ""
        self._bar: tqdm[Never] | None = None
        if stream.isatty():
            self._bar = tqdm(
                total=total,
                desc=label,
                unit=f" {unit}",
                file=stream,
                dynamic_ncols=True,
                leave=True,
                mininterval=0.1,
            )

    @property
    def is_bar(self) -> bool:
        return self._bar is not None

    def update(self, done: int, total: int | None = None, detail: str = "") -> None:
        """``done`` so far (of ``total``, if known); ``detail`` follows the count."""
        self._done, self._detail = done, detail
        if total is not None:
            self._total = total
        bar = self._bar
        if bar is not None:
            if total is not None and bar.total != total:
                bar.total = total
            bar.n = done
            bar.set_postfix_str(detail, refresh=False)
            bar.refresh()
            return
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._line()

    def close(self) -> None:
        """The last state: the bar's final draw, or a last plain line."""
        if self._bar is not None:
            self._bar.close()
            return
        self._line()

    def _line(self) -> None:
        count = f"{self._done}" if self._total is None else f"{self._done}/{self._total}"
        detail = f" ({self._detail})" if self._detail else ""
        self._stream.write(f"{self._label}: {count} {self._unit}{detail}\n")
        self._stream.flush()
