"""The nxlink client: HTTP/1.1 framing, one connection's life, the pool, and ``UpstreamClient``."""

from proxy.upstream.client import (
    LARGE_BODY,
    StreamFactory,
    UpstreamClient,
    UpstreamRequest,
    create_pool,
    json_headers,
)
from proxy.upstream.faults import ConnectFailed, ResponseBroken
from proxy.upstream.pool import Pool
from proxy.upstream.response import HIGH_WATER, Response

__all__ = [
    "HIGH_WATER",
    "LARGE_BODY",
    "ConnectFailed",
    "Pool",
    "Response",
    "ResponseBroken",
    "StreamFactory",
    "UpstreamClient",
    "UpstreamRequest",
    "create_pool",
    "json_headers",
]
