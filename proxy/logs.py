"""JSON log lines on stdout, the request-id stamp, the access logger and ``mask_key``."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Final

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from proxy.appkeys import REQUEST_ID, STARTED, TENANT, UPSTREAM_STATUS

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")

STANDARD_FIELDS: Final = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class RequestIdFilter(logging.Filter):
    """Stamps the current request id on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id and extras."""

    def __init__(self) -> None:
        super().__init__()
        self._encode = json.JSONEncoder(ensure_ascii=False, default=str).encode
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": f"{self._time(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in STANDARD_FIELDS:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return self._encode(line)

    def _time(self, created: float) -> str:
        """The UTC second, formatted once per second rather than once per line."""
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return self._stamp


def setup_logging(level: str) -> None:
    """Route every logger to JSON lines on stdout at ``level``."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    # No line prints the caller's file and line, thread or process: skip gathering them for
    # every record (a stack walk and three lookups per access line).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class AccessLogger(AbstractAccessLogger):
    """One JSON access line per request: who, what, how it ended and how long it took."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        tenant = request.get(TENANT)
        self.logger.info(
            "%s %s %s",
            request.method,
            request.path,
            response.status,
            extra={
                "request_id": request.get(REQUEST_ID, "-"),
                "tenant": tenant.alias if tenant is not None else None,
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "upstream_status": request.get(UPSTREAM_STATUS),
                "duration_ms": round(self._seconds(request, time) * 1000, 3),
                "bytes_in": request.content.total_bytes,  # chunked uploads have no length
                "bytes_out": response.body_length,
                "remote": request.remote,
            },
        )

    @staticmethod
    def _seconds(request: BaseRequest, fallback: float) -> float:
        """From the request id middleware's clock (uvloop's loop time has 1 ms steps)."""
        started = request.get(STARTED)
        return fallback if started is None else time.perf_counter() - started

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
