"""The nxlink signature, pinned by known-answer vectors worked out outside the code under test.

Every hex digest below was computed in a shell from the literal string to sign shown next to
it, e.g. ``printf '%s' 'accessKey=ak-test&...&accessSecret=sk-test' | md5sum`` (or ``sha256sum``),
in a UTF-8 terminal; the strings are written out by hand from SPEC "The nxlink signature".
"""

from __future__ import annotations

import hashlib

import pytest

from proxy.config import Secret
from proxy.signing import compute_sign, sign_headers, string_to_sign
from proxy.tenants import Credentials

TS = 1700000000000
MD5 = Credentials("ak-test", Secret("sk-test"), "8", "md5")
SHA256 = Credentials("ak-test", Secret("sk-test"), "8", "sha256")
APPEND_BODY = b'{"taskId": "t1", "list": [{"phoneNumber":"13800000000"}]}'
APPEND_STRING = (
    "accessKey=ak-test&action=callAppend&bizType=8&ts=1700000000000"
    '&body={"taskId": "t1", "list": [{"phoneNumber":"13800000000"}]}&accessSecret=sk-test'
)
NO_BODY_STRING = (
    "accessKey=ak-test&action=pageCallTaskInfo&bizType=8&ts=1700000000000&accessSecret=sk-test"
)


@pytest.mark.parametrize(
    ("creds", "action", "body", "expected"),
    [
        # printf '%s' "$APPEND_STRING" | md5sum
        (MD5, "callAppend", APPEND_BODY, "1b2a1291c7421ee6ca65fb286f972627"),
        # printf '%s' "$APPEND_STRING" | sha256sum
        (
            SHA256,
            "callAppend",
            APPEND_BODY,
            "9d356012a2c74c91619773ea1682d85fbbcbfed185d4f95d455da7b1be7e8264",
        ),
        # printf '%s' "$NO_BODY_STRING" | md5sum
        (MD5, "pageCallTaskInfo", b"", "5b8780a9214c06615906a4bb35796033"),
        (MD5, "pageCallTaskInfo", None, "5b8780a9214c06615906a4bb35796033"),
        # printf '%s' "$NO_BODY_STRING" | sha256sum
        (
            SHA256,
            "pageCallTaskInfo",
            b"",
            "0a6426518d58436b18d6e786e9e129658ad36bbb2c46e892ba42f76a04dfa65f",
        ),
        # printf '%s' 'accessKey=ak-test&action=callAppend&bizType=8&ts=1700000000000
        #   &body={"name":"张三","备注":"中文"}&accessSecret=sk-test' | md5sum   (one line)
        (
            MD5,
            "callAppend",
            '{"name":"张三","备注":"中文"}'.encode(),
            "8389cfd398fdb8d39072e099fa915b85",
        ),
        # printf '%s' 'accessKey=ak-test&action=callAppend&bizType=8&ts=1700000000000
        #   &body={ "z":1 ,  "a" : [ 2,1 ] }&accessSecret=sk-test' | md5sum   (one line)
        (MD5, "callAppend", b'{ "z":1 ,  "a" : [ 2,1 ] }', "d597ce4f3a1210aff2010f5da5076f1e"),
    ],
    ids=[
        "md5",
        "sha256",
        "md5-empty-body",
        "md5-none-body",
        "sha256-empty-body",
        "utf8",
        "spacing",
    ],
)
def test_sign_matches_known_answer(
    creds: Credentials, action: str, body: bytes | None, expected: str
) -> None:
    assert compute_sign(creds, action, TS, body) == expected
    assert sign_headers(creds, action, body, TS)["sign"] == expected


def test_string_to_sign_is_built_in_the_documented_order() -> None:
    assert string_to_sign(MD5, "callAppend", TS, APPEND_BODY) == APPEND_STRING.encode()


def test_empty_body_leaves_out_the_body_part() -> None:
    assert string_to_sign(MD5, "pageCallTaskInfo", TS, b"") == NO_BODY_STRING.encode()


def test_multipart_body_is_left_out_of_the_signature() -> None:
    upload = b'--x\r\nContent-Disposition: form-data; name="f"\r\n\r\ndata\r\n--x--\r\n'
    signed = string_to_sign(MD5, "pageCallTaskInfo", TS, upload, multipart=True)
    assert signed == NO_BODY_STRING.encode()
    # Same digest as the body-less vector above (md5sum of NO_BODY_STRING).
    headers = sign_headers(MD5, "pageCallTaskInfo", upload, TS, multipart=True)
    assert headers["sign"] == "5b8780a9214c06615906a4bb35796033"


def test_non_ascii_body_is_signed_as_its_utf8_bytes() -> None:
    body = '{"name":"张三","备注":"中文"}'.encode()
    expected = (
        "accessKey=ak-test&action=callAppend&bizType=8&ts=1700000000000"
        '&body={"name":"张三","备注":"中文"}&accessSecret=sk-test'
    )
    assert string_to_sign(MD5, "callAppend", TS, body) == expected.encode("utf-8")
    # Not the \\uXXXX escapes a JSON re-serialisation would produce.
    assert b"\\u" not in string_to_sign(MD5, "callAppend", TS, body)


def test_body_spacing_and_key_order_survive_verbatim() -> None:
    body = b'{ "z":1 ,  "a" : [ 2,1 ] }'
    signed = string_to_sign(MD5, "callAppend", TS, body)
    assert signed.endswith(b'&body={ "z":1 ,  "a" : [ 2,1 ] }&accessSecret=sk-test')


def test_sign_headers_returns_exactly_the_six_upstream_headers() -> None:
    creds = Credentials("ak-b", Secret("secret-b"), "9", "sha256")
    headers = sign_headers(creds, "callDelete", b'{"contactId":"c-1"}', 1712345678901)
    # printf '%s' 'accessKey=ak-b&action=callDelete&bizType=9&ts=1712345678901
    #   &body={"contactId":"c-1"}&accessSecret=secret-b' | sha256sum   (one line)
    assert headers == {
        "accessKey": "ak-b",
        "ts": "1712345678901",
        "bizType": "9",
        "action": "callDelete",
        "sign": "7ee6b42047fb0105e90d6617dd3876db28bd950ae313bbe375477818acea7180",
        "algorithm": "sha256",
    }


def test_sign_is_lowercase_hex_of_the_hand_written_string() -> None:
    literal = (
        "accessKey=ak-test&action=callAppend&bizType=8&ts=1700000000000"
        '&body={"taskId": "t1", "list": [{"phoneNumber":"13800000000"}]}&accessSecret=sk-test'
    )
    sign = sign_headers(MD5, "callAppend", APPEND_BODY, TS)["sign"]
    assert sign == hashlib.md5(literal.encode()).hexdigest()
    assert sign == sign.lower()


@pytest.mark.parametrize(
    "changed",
    [
        Credentials("ak-other", Secret("sk-test"), "8", "md5"),
        Credentials("ak-test", Secret("sk-other"), "8", "md5"),
        Credentials("ak-test", Secret("sk-test"), "9", "md5"),
    ],
    ids=["access-key", "secret", "biz-type"],
)
def test_every_credential_field_changes_the_sign(changed: Credentials) -> None:
    assert (
        compute_sign(changed, "callAppend", TS, APPEND_BODY) != "1b2a1291c7421ee6ca65fb286f972627"
    )


def test_timestamp_and_action_change_the_sign() -> None:
    assert (
        compute_sign(MD5, "callAppend", TS + 1, APPEND_BODY) != "1b2a1291c7421ee6ca65fb286f972627"
    )
    assert compute_sign(MD5, "callDelete", TS, APPEND_BODY) != "1b2a1291c7421ee6ca65fb286f972627"


def test_sign_headers_never_carry_the_secret() -> None:
    headers = sign_headers(MD5, "callAppend", APPEND_BODY, TS)
    assert all("sk-test" not in value for value in headers.values())
