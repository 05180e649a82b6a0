"""Logging set-up shared by every process: plain text for humans (default) or one JSON
object per line for journald/Loki, each line tagged with the process role and id."""

from __future__ import annotations

import io
import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "proc": self.tag,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("request_id", "method", "path", "model", "batch_id", "status", "latency_ms"):
            if hasattr(record, key):
                doc[key] = getattr(record, key)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(fmt: str, level: str, tag: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(tag))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {tag} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class PrintedLines(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` of a process that runs other people's code (a
    worker runs the model's handler): what it prints becomes log records of that
    process, one per line, instead of raw lines with no time or process that break a
    JSON log. Output written to the file descriptors themselves (C++ code) stays raw."""

    MAX_LINE = 8192  # a line with no end is logged in parts of this size

    def __init__(self, logger: logging.Logger, level: int, original: io.TextIOBase) -> None:
        self._log, self._level, self._original = logger, level, original
        self._part = ""
        self._busy = False  # logging itself failing prints to stderr: not into us again

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._original.fileno()

    def write(self, s: str) -> int:
        if self._busy:
            return self._original.write(s)
        self._busy = True
        try:
            *lines, self._part = (self._part + s).split("\n")
            while len(self._part) >= self.MAX_LINE:
                lines.append(self._part[: self.MAX_LINE])
                self._part = self._part[self.MAX_LINE :]
            for line in lines:
                if line.strip():
                    self._log.log(self._level, "%s", line.rstrip())
        finally:
            self._busy = False
        return len(s)

    def flush(self) -> None:
        if self._part.strip() and not self._busy:
            part, self._part = self._part, ""
            self.write(part + "\n")


def capture_prints(name: str) -> None:
    """Route ``print`` and other writes to sys.stdout (INFO) and sys.stderr (WARNING)
    through logging, under the logger ``name``. Call after ``setup_logging``, whose
    handler keeps the real stderr."""
    log = logging.getLogger(name)
    sys.stdout = PrintedLines(log, logging.INFO, sys.__stdout__)  # type: ignore[assignment,arg-type]
    sys.stderr = PrintedLines(log, logging.WARNING, sys.__stderr__)  # type: ignore[assignment,arg-type]
