"""Hypothesis properties: URL confinement, the header policy, phone-number normalisation."""

from __future__ import annotations

import re
from typing import Any, Final
from urllib.parse import unquote

from hypothesis import example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.errors import GatewayError
from proxy.forwarding import build_upstream_url, filter_request_headers, filter_response_headers
from proxy.numbers import PHONE, clean_phone, prepare_entries

BOUNDED: Final = settings(max_examples=200, deadline=None, database=None)

BASE_URLS: Final = (
    "http://127.0.0.1:8080",
    "https://api-westus.nxlink.ai",
    "https://gw.example.com/prefix",
    "https://gw.example.com/a/b/",
    "http://[::1]:9000/nx",
)
# Pieces a hostile path is made of: dots, encoded dots and slashes, backslashes, servlet path
# parameters, authority-looking parts, NULs, double encodings.
TRICKY: Final = (
    ".",
    "..",
    "..;",
    "..;x",
    ".;",
    "%2e",
    "%2E%2e",
    "%2e%2e;",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    "\\",
    "..\\",
    "/",
    "//",
    "%00",
    "%252e%252e",
    "@evil.com",
    "evil.com:80",
    "http:",
    "?",
    "#",
    "%3f",
    "%23",
    ";",
    "~",
    "%",
    "%zz",
    "é",
    "文件",
    "\u202e",
    "\ufeff",
)
PLAIN: Final = st.from_regex(r"[a-zA-Z0-9_-]{1,6}", fullmatch=True)
# Mostly plain segments with a tricky piece inside, so that many paths get past the easy
# refusals (empty segments) and the hard cases are reached.
INFIX: Final = st.builds("".join, st.tuples(PLAIN, st.sampled_from(TRICKY), PLAIN))
SEGMENT: Final = st.one_of(
    PLAIN,
    INFIX,
    INFIX,
    st.sampled_from(TRICKY),
    st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), min_size=1, max_size=8),
)
PREFIXES: Final = (
    "/openapi",
    "//openapi/",
    "/openapi//",
    "",
    "/",
    "http://evil/",
    "/x/../openapi/",
)
RAW_PATHS: Final = st.builds(
    lambda head, parts: head + "/".join(parts),
    st.one_of(st.just("/openapi/"), st.sampled_from(PREFIXES)),
    st.lists(SEGMENT, min_size=1, max_size=4),
)
# aiohttp ends the query at "#" (the fragment is never part of raw_query_string).
QUERIES: Final = st.one_of(
    st.just(""),
    st.text(st.characters(codec="utf-8", exclude_characters="#\r\n"), max_size=20),
    st.sampled_from(("a=1", "%23x", "@evil.com/x", "/../../x", "x=http://evil/")),
)


def unsafe_segment(segment: str) -> bool:
    """A segment some server would take for ``.``/``..`` or a path separator, however many
    times it decodes (servlet path parameters ignored)."""
    for _ in range(6):
        decoded = unquote(segment)
        if decoded == segment:
            break
        segment = decoded
    else:
        return True
    return segment.split(";", 1)[0] in ("", ".", "..") or any(c in segment for c in "/\\\x00")


@BOUNDED
@given(base=st.sampled_from(BASE_URLS), raw_path=RAW_PATHS, raw_query=QUERIES)
@example(base=BASE_URLS[2], raw_path="/openapi/%252e%252e/x", raw_query="")
@example(base=BASE_URLS[2], raw_path="/openapi/a%255cb", raw_query="")
@example(base=BASE_URLS[2], raw_path="/openapi/..;/x", raw_query="")
@example(base=BASE_URLS[2], raw_path="/openapi/a\\b", raw_query="")
@example(base=BASE_URLS[2], raw_path="/openapi/a/b", raw_query="@evil.com/x")
@example(base=BASE_URLS[0], raw_path="/openapi/@evil.com:80/x", raw_query="")
def test_no_generated_path_builds_a_url_off_the_base(
    base: str, raw_path: str, raw_query: str
) -> None:
    try:
        url = build_upstream_url(base, raw_path, raw_query)
    except GatewayError as exc:
        assert exc.status in (400, 404)
        return
    expected = URL(base)
    prefix = expected.path.rstrip("/") + "/openapi/"
    assert (url.scheme, url.host, url.port) == (expected.scheme, expected.host, expected.port)
    assert url.user is None and url.password is None and url.fragment == ""
    assert url.raw_path.startswith(prefix) and url.path.startswith(prefix)
    tail = url.raw_path[len(prefix) :].split("/")
    assert not any(unsafe_segment(segment) for segment in tail), url


# Never forwarded, whatever their case: SPEC "Forwarding rules" and RFC 9110 section 7.6.1.
NEVER_FORWARDED: Final = frozenset(
    {
        "x-api-key",
        "authorization",
        "cookie",
        "accesskey",
        "accesssecret",
        "ts",
        "sign",
        "biztype",
        "algorithm",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
    }
)
END_TO_END: Final = ("accept", "content-type", "user-agent", "x-trace", "x-custom-id", "if-match")
NAMES: Final = st.one_of(
    st.sampled_from(sorted(NEVER_FORWARDED | set(END_TO_END))),
    st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True),
).flatmap(lambda name: st.sampled_from((name, name.upper(), name.title())))
VALUES: Final = st.from_regex(r"[ -~]{0,20}", fullmatch=True)
HEADERS: Final = st.lists(st.tuples(NAMES, VALUES), max_size=12)


def connection_listed(headers: list[tuple[str, str]]) -> set[str]:
    """Header names a ``Connection`` header declares hop-by-hop."""
    values = [v for n, v in headers if n.lower() == "connection"]
    return {t.strip().lower() for v in values for t in v.split(",") if t.strip()}


@BOUNDED
@given(headers=HEADERS, listed=st.lists(NAMES, max_size=3), streamed=st.booleans())
def test_no_credential_or_hop_by_hop_request_header_is_ever_forwarded(
    headers: list[tuple[str, str]], listed: list[str], streamed: bool
) -> None:
    given_headers = [*headers, ("Connection", ", ".join(listed))]
    kept = filter_request_headers(CIMultiDictProxy(CIMultiDict(given_headers)), streamed=streamed)
    names = {name.lower() for name, _ in kept}
    hop = connection_listed(given_headers)
    assert not names & (NEVER_FORWARDED | hop)
    assert not any(name.startswith("x-forwarded-") for name in names)
    for name, value in headers:
        if name.lower() in END_TO_END and name.lower() not in hop:
            assert (name, value) in kept


@BOUNDED
@given(headers=HEADERS, listed=st.lists(NAMES, max_size=3))
def test_no_hop_by_hop_response_header_or_cookie_is_passed_back(
    headers: list[tuple[str, str]], listed: list[str]
) -> None:
    answer = [*headers, ("Set-Cookie", "s=1"), ("Connection", ", ".join(listed))]
    kept = filter_response_headers(answer)
    names = {name.lower() for name, _ in kept}
    hop = connection_listed(answer) | {"connection", "keep-alive", "transfer-encoding", "te"}
    assert not names & (hop | {"set-cookie", "trailer", "upgrade", "proxy-connection"})
    for name, value in headers:
        if name.lower() in END_TO_END and name.lower() not in hop:
            assert (name, value) in kept


PHONE_TEXT: Final = st.text(
    st.one_of(
        st.sampled_from("0123456789"),
        st.sampled_from(" -+\t\u00a0\u3000()٣０x"),
    ),
    max_size=40,
)
NOISE: Final = re.compile(r"[\s-]")


@BOUNDED
@given(value=PHONE_TEXT)
def test_a_clean_number_is_plain_digits_and_cleaning_it_again_changes_nothing(value: str) -> None:
    try:
        phone = clean_phone(value)
    except ValueError:
        assert not PHONE.fullmatch(NOISE.sub("", value))
        return
    assert re.fullmatch(r"\+?[0-9]{3,32}", phone)
    assert phone == NOISE.sub("", value)
    assert clean_phone(phone) == phone


def entry(phone: str, contact_id: str | None) -> object:
    """A plain-string entry, or an object one (with or without its own contactId)."""
    if contact_id is None:
        return phone
    return {"phoneNumber": phone, "contactId": contact_id} if contact_id else {"phoneNumber": phone}


ENTRIES: Final = st.lists(
    st.builds(entry, PHONE_TEXT, st.one_of(st.none(), st.sampled_from(("", "c1", "c2", "c3")))),
    max_size=20,
)


@BOUNDED
@given(numbers=ENTRIES)
def test_prepared_entries_keep_order_and_have_unique_contact_ids(numbers: list[Any]) -> None:
    entries = prepare_entries(numbers, [])
    assert len(entries) == len(numbers)
    items = [e.item for e in entries if e.item is not None]
    ids = [item["contactId"] for item in items]
    assert len(ids) == len(set(ids))
    for raw, prepared in zip(numbers, entries, strict=True):
        if prepared.item is None:
            assert prepared.error
            continue
        sent = raw if isinstance(raw, str) else raw["phoneNumber"]
        assert prepared.item["phoneNumber"] == clean_phone(sent)
        assert PHONE.fullmatch(prepared.item["phoneNumber"])
        if isinstance(raw, dict) and raw.get("contactId"):
            assert prepared.item["contactId"] == raw["contactId"]
