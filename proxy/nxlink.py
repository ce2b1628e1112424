"""Facts of the nxlink OpenAPI contract shared by the gateway and the sandbox."""

import time
from typing import Final

DEFAULT_BASE_URL: Final = "https://api-westus.nxlink.ai"
DEFAULT_BIZ_TYPE: Final = "8"
ALGORITHMS: Final = ("md5", "sha256")
APPEND_PATH: Final = "/openapi/aiagent/call/append"
APPEND_ACTION: Final = "callAppend"
SUCCESS_CODES: Final = frozenset({0, 200})

# Known operations: path under the base URL → action.
KNOWN_ACTIONS: Final = {
    "/openapi/aiagent/task/list": "pageCallTaskInfo",
    "/openapi/aiagent/call/list": "pageCallRecords",
    APPEND_PATH: APPEND_ACTION,
    "/openapi/aiagent/call/delete": "callDelete",
    "/openapi/aiagent/order/delete": "operateCallRecords",
}


def now_ms() -> int:
    """Wall-clock Unix time in milliseconds, as nxlink's ``ts`` wants it."""
    return time.time_ns() // 1_000_000
