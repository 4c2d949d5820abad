"""Logging for the daemons: concise human-readable lines by default, one JSON object per line on request."""

from __future__ import annotations

import json
import logging
import sys
import time


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (unix seconds), level, logger, msg, and role when the daemon names it."""

    def __init__(self, role: str = "") -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.role:
            entry["role"] = self.role
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(*, json_lines: bool = False, level: str = "INFO", name: str = "") -> None:
    """Configure the root logger once for a daemon process; `name` tags each human-readable line."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(_JsonFormatter(name))
    else:
        tag = f"{name} " if name else ""
        formatter = logging.Formatter(f"%(asctime)s {tag}%(levelname)s %(message)s", "%H:%M:%S")
        formatter.converter = time.localtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries are chatty at INFO (every S3 call, every HTTP request); their warnings still show.
    for noisy in ("botocore", "boto3", "urllib3", "httpx", "httpcore", "s3transfer", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
