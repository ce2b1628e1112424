"""JSON log lines on stdout, the request-id stamp, the access logger and ``mask_key``."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from time import time_ns as wall_clock_ns
from typing import Final, TextIO

import orjson
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from proxy.appkeys import (
    CONTEXT,
    RequestContext,
)

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")

# Dataclasses and datetimes go through str() as with json's default=str, so a dataclass
# holding a Secret is still rendered by its masking __repr__.
ORJSON_OPTIONS: Final = (
    orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_NON_STR_KEYS
)
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
        # ASCII-escaped: the fallback exists for lone surrogates, which a UTF-8 stream refuses.
        self._fallback = json.JSONEncoder(default=str).encode
        self._stamp = (-1, "")  # (UTC second, its text): one tuple, so threads never mix them

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in vars(record).items() if k not in STANDARD_FIELDS}
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        message = record.getMessage()
        return self.line(
            record.created, record.msecs, record.levelname, record.name, message, fields
        )

    def line(
        self,
        created: float,
        msecs: float,
        level: str,
        logger: str,
        message: str,
        fields: dict[str, object],
    ) -> str:
        """The one layout of a log line, for records and for the access log's direct path."""
        line = {
            "time": f"{self._time(created)}.{int(msecs):03d}Z",
            "level": level.lower(),
            "logger": logger,
            "message": message,
            **fields,
        }
        try:
            # orjson: about 16x faster than json here; the same text for what logs carry.
            return orjson.dumps(line, default=str, option=ORJSON_OPTIONS).decode()
        except (orjson.JSONEncodeError, TypeError):
            return self._fallback(line)  # e.g. lone surrogates or ints past 64 bits

    def _time(self, created: float) -> str:
        """The UTC second, formatted once per second rather than once per line."""
        second = int(created)
        known, text = self._stamp
        if second != known:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._stamp = (second, text)
        return text


class JsonLineHandler(logging.StreamHandler):  # type: ignore[type-arg]  # generic in typeshed only
    """The handler ``setup_logging`` installs: JSON lines on a stream, request ids stamped."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.formatter: JsonFormatter = JsonFormatter()
        self.addFilter(RequestIdFilter())

    def sole_sink(self, logger: logging.Logger, level: int) -> bool:
        """True when a ``level`` record of ``logger`` would reach this handler and nothing else
        (no other handler, no filter): then writing the line directly changes nothing."""
        if self.level > level or len(self.filters) != 1:
            return False
        if not isinstance(self.filters[0], RequestIdFilter):
            return False
        if not isinstance(self.formatter, JsonFormatter):
            return False
        current: logging.Logger | None = logger
        while current is not None:
            if current.filters:
                return False
            if current.handlers:
                return current.handlers == [self]
            if not current.propagate:
                return False
            current = current.parent
        return False

    def write_line(self, line: str) -> None:
        """One finished line, written and flushed like ``emit`` does."""
        self.acquire()
        try:
            self.stream.write(line + self.terminator)
            self.flush()
        finally:
            self.release()


def setup_logging(level: str) -> None:
    """Route every logger to JSON lines on stdout at ``level``."""
    handler = JsonLineHandler(sys.stdout)
    # No line prints the caller's file and line, thread or process: skip gathering them for
    # every record (a stack walk and three lookups per access line).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def body_bytes_out(
    request: BaseRequest, response: StreamResponse, ctx: RequestContext | None
) -> int:
    """The body bytes the client was sent, as ``bytes_in`` counts the body received (aiohttp's
    ``body_length`` adds the status line, headers and chunk framing): a streamed answer's as
    written, another's by its length; none for HEAD or a status without a body."""
    if ctx is not None and ctx.body_sent is not None:
        return ctx.body_sent
    if request.method == "HEAD" or response.status in (204, 304) or response.status < 200:
        return 0
    return response.content_length or 0


class AccessLogger(AbstractAccessLogger):
    """One JSON access line per request: who, what, how it ended and how long it took."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        # No context when aiohttp refused the request before any middleware ran.
        ctx = request.get(CONTEXT)
        tenant = ctx.tenant if ctx is not None else None
        method, path, status = request.method, request.path, response.status
        fields: dict[str, object] = {
            "request_id": ctx.request_id if ctx is not None else "-",
            "tenant": tenant.alias if tenant is not None else None,
            "method": method,
            "path": path,
            "status": status,
            "upstream_status": ctx.upstream_status if ctx is not None else None,
            "duration_ms": round(self._seconds(ctx, time) * 1000, 3),
            "bytes_in": request.content.total_bytes,  # chunked uploads have no length
            "bytes_out": body_bytes_out(request, response, ctx),
            "remote": request.remote,
        }
        sink = _direct_sink(self.logger)
        if sink is not None:
            # The same line the record would give, without building one: a LogRecord and the
            # handler chain cost about a third of a small forward's CPU (make bench, callgrind).
            now = wall_clock_ns()
            message = f"{method} {path} {status}"
            msecs = (now % 1_000_000_000) // 1_000_000
            try:
                line = sink.formatter.line(
                    now / 1e9, msecs, "INFO", self.logger.name, message, fields
                )
                sink.write_line(line)
                return
            except (OSError, ValueError):  # e.g. a closed pipe: the record path below
                pass  # reports it the way logging does
        self.logger.info("%s %s %s", method, path, status, extra=fields)

    @staticmethod
    def _seconds(ctx: RequestContext | None, fallback: float) -> float:
        """From the request id middleware's clock (uvloop's loop time has 1 ms steps)."""
        return fallback if ctx is None else time.perf_counter() - ctx.started

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def _direct_sink(logger: logging.Logger) -> JsonLineHandler | None:
    """The JSON handler when it alone would get ``logger``'s INFO records, else None."""
    root = logging.getLogger()
    if len(root.handlers) != 1 or not logger.isEnabledFor(logging.INFO):
        return None
    handler = root.handlers[0]
    if isinstance(handler, JsonLineHandler) and handler.sole_sink(logger, logging.INFO):
        return handler
    return None
