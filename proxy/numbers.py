"""append-numbers input: the request checked field by field, each number made ready for nxlink."""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NotRequired, TypedDict, TypeVar

from proxy import errors

T = TypeVar("T")
PHONE: Final = re.compile(r"\+?[0-9]{3,32}")
PHONE_NOISE: Final = re.compile(r"[\s-]+")
PARAMS_SHAPE: Final = "must be an array of {name, value} (string name, string or number value)"


class Param(TypedDict):
    """One template variable of a number, e.g. ``{"name": "订单号", "value": "A1"}``."""

    name: str
    value: str | int | float


class ContactItem(TypedDict):
    """One entry of nxlink's call/append ``list``."""

    contactId: str
    phoneNumber: str
    name: NotRequired[str]
    params: NotRequired[list[Param]]


@dataclass(frozen=True, slots=True)
class Entry:
    """One input entry: the item for nxlink, or why there is none."""

    shown: object
    item: ContactItem | None = None
    error: str = ""


@dataclass(frozen=True, slots=True)
class AppendCall:
    """A validated append-numbers request."""

    task_id: str
    entries: tuple[Entry, ...]
    auto_flow_id: int | None = None
    country_code: str | None = None


def decode_json(raw: bytes) -> object:
    """The request document; anything but strict JSON is a 400 ``INVALID_JSON``."""
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        message = f"Request body is not valid JSON: {exc}"
        raise errors.RequestError(message, error="INVALID_JSON") from exc


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON value")


def parse_call(doc: object, max_numbers: int) -> AppendCall:
    """Check the request; a bad entry stays with its entry, anything else is a 4xx."""
    if not isinstance(doc, dict):
        raise errors.RequestError("Request body must be a JSON object", error="INVALID_JSON")
    task_id = doc.get("taskId")
    if task_id is None or (isinstance(task_id, str) and not task_id.strip()):
        raise errors.RequestError("taskId is required", error="MISSING_TASK_ID")
    numbers = doc.get("phoneNumbers")
    if not isinstance(numbers, list) or not numbers:
        message = "phoneNumbers must be a non-empty array"
        raise errors.RequestError(message, error="INVALID_PHONE_NUMBERS")
    if len(numbers) > max_numbers:
        message = f"phoneNumbers has {len(numbers)} entries; at most {max_numbers} per request"
        raise errors.PayloadTooLarge(message, error="TOO_MANY_NUMBERS")
    try:
        task_id, shared = _text(task_id, "taskId"), _optional(doc, "params", parse_params)
        flow, country = _optional(doc, "autoFlowId", _integer), _optional(doc, "countryCode", _text)
    except ValueError as exc:
        raise errors.RequestError(str(exc), error="INVALID_FIELD") from exc
    return AppendCall(task_id, prepare_entries(numbers, shared or []), flow, country)


def _optional(doc: dict[str, Any], name: str, parse: Callable[[object, str], T]) -> T | None:
    """``doc[name]`` parsed, or None when absent or null."""
    value = doc.get(name)
    return None if value is None else parse(value, name)


def _integer(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer")
    return value


def _text(value: object, name: str) -> str:
    if not isinstance(value, str) or not _encodable(value):
        raise ValueError(f"{name} must be a string of Unicode text")
    return value


def _encodable(text: str) -> bool:
    """False for JSON escapes of lone surrogates (``"\\udcff"``), which UTF-8 cannot carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_params(value: object, name: str = "params") -> list[Param]:
    """``[{"name", "value"}]`` rebuilt from what the client sent."""
    if not isinstance(value, list) or not all(_is_param(p) for p in value):
        raise ValueError(f"{name} {PARAMS_SHAPE}")
    return [{"name": p["name"], "value": p["value"]} for p in value]


def _is_param(value: object) -> bool:
    if not isinstance(value, dict):
        return False
    name, given = value.get("name"), value.get("value")
    # math.isfinite overflows on a huge int: ints are finite anyway, so only floats ask it.
    number = (isinstance(given, int) and not isinstance(given, bool)) or (
        isinstance(given, float) and math.isfinite(given)
    )
    text = isinstance(given, str) and _encodable(given)
    return isinstance(name, str) and bool(name.strip()) and _encodable(name) and (text or number)


def clean_phone(value: object) -> str:
    """The number without spaces and dashes; ``ValueError`` says why it is unusable."""
    if value is None:
        raise ValueError("phoneNumber is missing")
    phone = PHONE_NOISE.sub("", _text(value, "phoneNumber"))
    if not phone:
        raise ValueError("phoneNumber is empty")
    if not PHONE.fullmatch(phone):
        raise ValueError(f"phoneNumber {value!r} is not 3-32 digits with an optional leading +")
    return phone


def prepare_entries(numbers: Sequence[object], shared: list[Param]) -> tuple[Entry, ...]:
    """Every input entry made ready for nxlink, each with its own unique contactId."""
    seen: set[str] = set()
    return tuple(_prepare(raw, shared, seen) for raw in numbers)


def _prepare(raw: object, shared: list[Param], seen: set[str]) -> Entry:
    shown = raw.get("phoneNumber") if isinstance(raw, dict) else raw
    try:
        item = _contact(raw, shared)
    except ValueError as exc:
        return Entry(shown, error=str(exc))
    if item["contactId"] in seen:
        return Entry(shown, error=f"contactId {item['contactId']!r} is repeated in this request")
    seen.add(item["contactId"])
    return Entry(item["phoneNumber"], item)


def _contact(raw: object, shared: list[Param]) -> ContactItem:
    """The nxlink list item; global params go to plain-string entries only."""
    if isinstance(raw, str):
        return _item(clean_phone(raw), None, None, shared)
    if not isinstance(raw, dict):
        raise ValueError("an entry must be a phone number string or a {phoneNumber, params} object")
    phone, params = clean_phone(raw.get("phoneNumber")), _optional(raw, "params", parse_params)
    return _item(phone, _optional(raw, "contactId", _text), _optional(raw, "name", _text), params)


def _item(
    phone: str, contact_id: str | None, name: str | None, params: list[Param] | None
) -> ContactItem:
    item: ContactItem = {"contactId": contact_id or secrets.token_hex(16), "phoneNumber": phone}
    if name is not None:
        item["name"] = name
    if params:
        item["params"] = params
    return item
