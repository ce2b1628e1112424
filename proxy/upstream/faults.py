"""The failures of an upstream exchange, as the pool and its connections raise them."""

from __future__ import annotations


class ConnectFailed(ConnectionError):
    """No connection could be made: nothing was sent, so the request may be tried again."""


class ResponseBroken(ConnectionError):
    """The connection failed or nxlink sent something that is not HTTP/1.1 after the request
    was (partly) sent."""


class StaleConnection(ResponseBroken):
    """A reused connection was closed by nxlink before any byte of an answer: the request
    may be sent again on a new connection if replaying it is safe."""


class TLSFailed(ConnectionError):
    """The TLS handshake failed (e.g. the certificate does not verify): not worth a retry."""


class ReadTimedOut(ResponseBroken):
    """nxlink sent nothing for longer than the read timeout in the middle of an answer."""


class AnswerTimedOut(TimeoutError):
    """The request was written but no answer's head came before the deadline: nxlink may have
    acted on it (a wait for a pool slot or a connection that timed out sent nothing)."""
