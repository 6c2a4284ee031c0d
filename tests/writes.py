"""A target for ``tracking.Writer`` in tests: it pickles to the writer process, which records each call in a file."""

from __future__ import annotations

import os
import time
from pathlib import Path


class Recorder:
    """Appends ``<pid> <what>`` per call to ``path``, ``<pid> sent <monotonic time>`` per send."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _write(self, line: str) -> None:
        with self.path.open("a") as file:
            file.write(f"{os.getpid()} {line}\n")

    def record(self, number: int, seconds: float = 0.0) -> None:
        time.sleep(seconds)
        self._write(str(number))

    def fail(self) -> None:
        raise ZeroDivisionError("planted")

    def send(self) -> None:
        self._write(f"sent {time.monotonic()}")

    def lines(self) -> list[list[str]]:
        return [line.split() for line in self.path.read_text().splitlines()] if self.path.exists() else []
