"""Hostile request bodies for ``POST /enrich``: named worst cases, each at most ``max_body``.

Every field the request path reads gets its worst values: strings as long as the body allows,
the deepest nesting, the largest numbers, GPP headers with the largest Fibonacci ranges, the
most eids and imps, duplicate keys, wrong types beside a huge unknown payload (the lenient
decode path), lone surrogates and invalid UTF-8. ``is_json`` says whether a body is JSON by
RFC 8259 (UTF-8, no depth limit), which decides whether a 400 is an allowed answer.
"""

from __future__ import annotations

import functools
import json
import re
import resource
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from enrich_server import openrtb
from tests.gpp_strings import base64url, fibonacci_code, gpp_string, header, us_section
from tests.tcf_strings import CONSENTED

#: Data (heap) cap for a process that runs these bodies (and its children): some make
#: today's decoders allocate without bound, which must end in MemoryError, not the OOM killer.
MEMORY_LIMIT: Final = 4 << 30


def cap_memory(limit: int = MEMORY_LIMIT) -> None:
    """Cap this process's data (RLIMIT_DATA: heap and private mappings, not the store's file
    mapping, which an address-space cap would count at its full 64 GiB map) at ``limit``."""
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(
        resource.RLIMIT_DATA, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard)
    )


@dataclass(frozen=True)
class Body:
    """One hostile body: its case name, bytes, and whether it is JSON (else 400 is right)."""

    name: str
    body: bytes
    json: bool = True


#: Placeholder replaced by raw JSON text once a template is encoded.
_SLOT: Final = "\x01slot\x01"
_SLOT_JSON: Final = json.dumps(_SLOT).encode()
_B64_FILLER: Final = "A"  # zero bits: a consent or GPP string stays decodable however long
USNAT: Final = 7
#: A GPP string the policy can read, for bodies whose hostile part is elsewhere.
GPP_OK: Final = gpp_string({USNAT: us_section({})})


def _embed(template: Any, raw: bytes) -> bytes:
    """``template`` as compact JSON with its slot replaced by the raw JSON text ``raw``."""
    encoded = json.dumps(template, separators=(",", ":")).encode()
    return encoded.replace(_SLOT_JSON, raw, 1)


def _fit(make: Callable[[int], bytes], max_body: int) -> bytes:
    """``make(n)`` for (about) the largest ``n`` whose body fits in ``max_body``; ``make``
    grows with ``n``, by units that may widen (``k9`` then ``k10``)."""
    base = len(make(0))
    n = max(0, (max_body - base) // max(1, len(make(1)) - base))
    while n > 0:
        body = make(n)
        if len(body) <= max_body:
            return body
        n = min(n - 1, n * (max_body - base) // (len(body) - base))
    return make(0)


def _string(text: str) -> bytes:
    return json.dumps(text, ensure_ascii=False).encode()


# --- strings: every string field we read, as long as the body allows ----------------------

_STRING_FIELDS: Final[dict[str, tuple[Callable[[Any], Any], str]]] = {
    # field -> (template around the slot, the string's leading text before the filler)
    "user.id": (lambda v: {"user": {"id": v}}, ""),
    "user.consent": (lambda v: {"regs": {"gdpr": 1}, "user": {"consent": v}}, CONSENTED),
    "user.ext.consent": (
        lambda v: {"regs": {"gdpr": 1}, "user": {"ext": {"consent": v}}},
        CONSENTED,
    ),
    "regs.us_privacy": (lambda v: {"regs": {"us_privacy": v}}, "1YNN"),
    "regs.ext.us_privacy": (lambda v: {"regs": {"ext": {"us_privacy": v}}}, "1YNN"),
    "regs.gpp": (
        lambda v: {"regs": {"gpp": v, "gpp_sid": [USNAT]}},
        gpp_string({USNAT: us_section({})}),
    ),
    # the TCF EU section of a GPP string, with gdpr=1: decoded by the TCF reader
    "regs.gpp.tcf_eu": (
        lambda v: {"regs": {"gdpr": 1, "gpp": v, "gpp_sid": [2]}},
        gpp_string({2: CONSENTED}),
    ),
    "device.ifa": (lambda v: {"device": {"ifa": v}}, ""),
    "site.domain": (lambda v: {"site": {"domain": v}}, ""),
    "app.bundle": (lambda v: {"app": {"bundle": v}}, ""),
    "imp.gpid": (lambda v: {"imp": [{"gpid": v}]}, ""),
    "imp.ext.gpid": (lambda v: {"imp": [{"ext": {"gpid": v}}]}, ""),
    "user.eids.source": (lambda v: {"user": {"eids": [{"source": v, "uids": [{"id": "x"}]}]}}, ""),
    "user.eids.uids.id": (
        lambda v: {"user": {"eids": [{"source": "id5-sync.com", "uids": [{"id": v}]}]}},
        "",
    ),
    "user.ext.eids.uids.id": (
        lambda v: {"user": {"ext": {"eids": [{"source": "id5-sync.com", "uids": [{"id": v}]}]}}},
        "",
    ),
}


def _strings(max_body: int) -> Iterator[Body]:
    for field, (template, lead) in _STRING_FIELDS.items():
        filler = _B64_FILLER if lead else "a"
        yield Body(
            f"string_max_{field}",
            _fit(lambda n, t=template, s=lead, f=filler: _embed(t(_SLOT), _string(s + f * n)),  # type: ignore[misc]
                 max_body),
        )  # fmt: skip
    user_id = _STRING_FIELDS["user.id"][0]
    # Multi-byte characters and \u escapes: more decoding work per byte.
    yield Body(
        "string_max_user.id_utf8",
        _fit(lambda n: _embed(user_id(_SLOT), _string("\u00e9" * n)), max_body),
    )
    yield Body(
        "string_max_user.id_escapes",
        _fit(lambda n: _embed(user_id(_SLOT), b'"' + b"\\u00e9" * n + b'"'), max_body),
    )


# --- nesting --------------------------------------------------------------------------------


@functools.cache
def decoder_depth_limit() -> int:
    """The deepest array nesting msgspec decodes (beyond it: ``RecursionError``)."""
    low, high = 1, 1 << 16
    while low < high:
        mid = (low + high + 1) // 2
        try:
            msgspec.json.decode(b"[" * mid + b"]" * mid)
        except RecursionError:
            high = mid - 1
        else:
            low = mid
    return low


def _nest(depth: int, leaf: bytes = b"") -> bytes:
    return b"[" * depth + leaf + b"]" * depth


def _nesting(max_body: int) -> Iterator[Body]:
    limit = decoder_depth_limit()
    deepest = (max_body - 64) // 2
    for name, template in (
        ("unknown", {"user": {"id": "u1"}, "ext": _SLOT}),
        ("user.ext", {"user": {"id": "u1", "ext": _SLOT}}),
        ("user.eids", {"user": {"id": "u1", "eids": _SLOT}}),
        ("regs", {"user": {"id": "u1"}, "regs": _SLOT}),
        ("imp", {"user": {"id": "u1"}, "imp": _SLOT}),
    ):
        yield Body(f"deep_max_{name}", _embed(template, _nest(deepest)))
        # just inside what the decoder follows (the template adds up to 3 levels)
        yield Body(f"deep_at_limit_{name}", _embed(template, _nest(limit - 3)))
    yield Body(
        "deep_max_unknown_objects",
        _fit(lambda n: _embed({"ext": _SLOT}, b'{"a":' * n + b"0" + b"}" * n), max_body),
    )
    # Many siblings each nested just inside the limit, on the lenient path (user.id wrong):
    # the whole body becomes Python lists.
    sibling = _nest(limit - 4, b"0")
    yield Body(
        "deep_wide_lenient",
        _fit(lambda n: _embed({"user": {"id": 5}, "ext": _SLOT},
                              b"[" + b",".join([sibling] * n) + b"]"), max_body),
    )  # fmt: skip


# --- numbers --------------------------------------------------------------------------------

_NUMBER_FIELDS: Final[dict[str, Callable[[Any], Any]]] = {
    "regs.coppa": lambda v: {"user": {"id": "u1"}, "regs": {"coppa": v}},
    "user.id": lambda v: {"user": {"id": v}, "site": {"domain": "example.com"}},
    "device.lmt": lambda v: {"device": {"ifa": "4d2b9a0e-6f1c-4b8e-9d7a-2c3e5f6a7b8c", "lmt": v}},
    "regs.ext.gdpr": lambda v: {"user": {"id": "u1", "consent": CONSENTED},
                                "regs": {"ext": {"gdpr": v}}},
    "regs.gpp_sid": lambda v: {"user": {"id": "u1"}, "regs": {"gpp": GPP_OK, "gpp_sid": [v]}},
    "unknown": lambda v: {"user": {"id": "u1"}, "ext": {"x": v}},
}  # fmt: skip


def _numbers(max_body: int) -> Iterator[Body]:
    for field, template in _NUMBER_FIELDS.items():
        yield Body(f"int_4301_digits_{field}", _embed(template(_SLOT), b"9" * 4301))
        yield Body(
            f"int_max_digits_{field}",
            _fit(lambda n, t=template: _embed(t(_SLOT), b"9" * (n + 1)), max_body),  # type: ignore[misc]
        )
        yield Body(f"float_1e400_{field}", _embed(template(_SLOT), b"1e400"))
        yield Body(f"float_-1e400_{field}", _embed(template(_SLOT), b"-1e400"))
        yield Body(
            f"float_max_digits_{field}",
            _fit(lambda n, t=template: _embed(t(_SLOT), b"1." + b"1" * n + b"e5"), max_body),  # type: ignore[misc]
        )


# --- GPP headers with the largest Fibonacci ranges -----------------------------------------


def range_header(entries: list[str]) -> str:
    """A GPP header (type 3, version 1) of already coded entries."""
    return base64url(f"{3:06b}{1:06b}{len(entries):012b}" + "".join(entries))


def range_entry(start_delta: int, span: int) -> str:
    """One range entry: ids ``last + start_delta`` through ``... + span``."""
    return "1" + fibonacci_code(start_delta) + fibonacci_code(span)


def _gpp(max_body: int) -> Iterator[Body]:
    def body(gpp: str) -> bytes:
        return _embed({"user": {"id": "u1"}, "regs": {"gpp": _SLOT}}, _string(gpp))

    yield Body("gpp_range_issue_DBAB5USgCKY", body("DBAB5USgCKY~x"))
    yield Body("gpp_range_1e9", body(range_header([range_entry(1, 10**9)]) + "~x"))
    yield Body("gpp_range_1e100", body(range_header([range_entry(1, 10**100)]) + "~x"))
    # the most entries a header holds (12-bit count), each a 20,000,000-id range
    many = range_header([range_entry(1, 20_000_000)] * 4095)
    yield Body("gpp_ranges_4095x2e7", body(many + "~x" * 4095))
    # one Fibonacci integer as long as the body allows: zeros, then the terminating 11
    yield Body(
        "gpp_fibonacci_max",
        _fit(lambda n: body(base64url(f"{3:06b}{1:06b}{1:012b}1" + "11" + "0" * 6 * n + "11")
                            + "~x"), max_body),
    )  # fmt: skip
    yield Body(
        "gpp_sections_4095",
        body(header(list(range(1, 4096))) + "~" + "~".join([us_section({})] * 4095)),
    )
    yield Body(
        "gpp_sid_max",
        _fit(lambda n: _embed({"user": {"id": "u1"}, "regs": {"gpp": GPP_OK, "gpp_sid": _SLOT}},
                              ("[" + ",".join(["7"] * (n + 1)) + "]").encode()), max_body),
    )  # fmt: skip


# --- many eids, imps, keys ------------------------------------------------------------------


def _eid(i: int) -> str:
    return f'{{"source":"s{i}.example","uids":[{{"id":"u{i}"}}]}}'


def _gpid(i: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
    return alphabet[i % 64] + alphabet[i // 64 % 64] + alphabet[i // 4096 % 64]


def _lists(max_body: int) -> Iterator[Body]:
    def eids(count: int, where: str = "eids") -> bytes:
        template = (
            {"user": {"eids": _SLOT}} if where == "eids" else {"user": {"ext": {"eids": _SLOT}}}
        )
        return _embed(template, ("[" + ",".join(_eid(i) for i in range(count)) + "]").encode())

    yield Body("eids_10000", eids(10_000))
    yield Body("ext_eids_10000", eids(10_000, "ext"))
    yield Body("eids_max", _fit(eids, max_body))
    yield Body(
        "uids_max",
        _fit(lambda n: _embed({"user": {"eids": [{"source": "id5-sync.com", "uids": _SLOT}]}},
             ("[" + ",".join(f'{{"id":"u{i}"}}' for i in range(n)) + "]").encode()), max_body),
    )  # fmt: skip

    def imps(with_gpid: int, total: int, field: str = "gpid") -> bytes:
        one = '{"gpid":"%s"}' if field == "gpid" else '{"ext":{"gpid":"%s"}}'
        items = [one % _gpid(i) for i in range(with_gpid)] + ["{}"] * (total - with_gpid)
        return _embed({"imp": _SLOT}, ("[" + ",".join(items) + "]").encode())

    # 100,000 imps, as many of them with a distinct gpid as the body holds
    yield Body("imps_100000_gpid", _fit(lambda n: imps(min(n, 100_000), 100_000), max_body))
    yield Body("imps_max_gpid", _fit(lambda n: imps(n, n), max_body))
    yield Body("imps_max_ext_gpid", _fit(lambda n: imps(n, n, "ext"), max_body))


def _members(prefix: bytes, item: bytes, suffix: bytes, max_body: int) -> bytes:
    """``prefix item,item,...,item suffix`` with as many items as fit."""
    return _fit(lambda n: prefix + b",".join([item] * (n + 1)) + suffix, max_body)


def _duplicates(max_body: int) -> Iterator[Body]:
    consent = b'{"user":{"consent":"' + CONSENTED.encode() + b'"},"regs":{'
    for name, prefix, item, suffix in (
        ("user.id", b'{"user":{', b'"id":"a"', b"}}"),
        ("top_user", b"{", b'"user":{"id":"a"}', b"}"),
        ("regs.gdpr", consent, b'"gdpr":1', b"}}"),
        ("unknown", b'{"user":{"id":"u1"},', b'"x":1', b"}"),
        ("unknown_lenient", b'{"user":5,', b'"x":1', b"}"),
    ):
        yield Body(f"duplicate_keys_{name}", _members(prefix, item, suffix, max_body))
    yield Body(
        "distinct_keys_lenient",
        _fit(lambda n: b'{"user":5,' + ",".join(f'"k{i}":0' for i in range(n + 1)).encode()
             + b"}", max_body),
    )  # fmt: skip


# --- wrong types beside a huge unknown payload ----------------------------------------------

#: A wrong-typed value for every field (and container) we read.
WRONG_TYPES: Final[dict[str, Any]] = {
    "user": 5, "user.id": 5, "user.eids": "x", "user.eids[]": 5, "user.eids[].source": 5,
    "user.eids[].uids": "x", "user.eids[].uids[]": 5, "user.eids[].uids[].id": 5,
    "user.consent": 5, "user.ext": "x", "user.ext.consent": [], "user.ext.eids": {},
    "device": [], "device.ifa": 5, "device.lmt": "x", "site": 1, "site.domain": {},
    "app": "x", "app.bundle": [], "regs": "bad", "regs.coppa": "x", "regs.gdpr": "x",
    "regs.us_privacy": 5, "regs.gpp": 5, "regs.gpp_sid": "x", "regs.gpp_sid[]": "x",
    "regs.ext": 5, "regs.ext.gdpr": {}, "regs.ext.us_privacy": [], "imp": {}, "imp[]": 5,
    "imp[].gpid": 5, "imp[].ext": 5, "imp[].ext.gpid": [],
}  # fmt: skip


def _set(request: dict[str, Any], path: str, value: Any) -> None:
    """Set ``path`` (dots, ``[]`` for a one-item list) in ``request``, creating containers."""
    node: Any = request
    parts = path.split(".")
    for i, part in enumerate(parts):
        key, is_list, last = part.removesuffix("[]"), part.endswith("[]"), i == len(parts) - 1
        if not is_list:
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
            continue
        items = node.get(key)
        if not isinstance(items, list):
            items = node[key] = [{}]
        if last:
            items[0] = value
        else:
            node = items[0]


#: Items of the huge unknown payload: small containers, many Python objects once decoded.
_PAYLOADS: Final = {"mixed": b'{"a":[1,"b",{}],"c":null}', "objects": b"{}", "strings": b'"ab"'}


def _blob(item: bytes, n: int) -> bytes:
    return b"[" + b",".join([item] * n) + b"]"


def _wrong_types(max_body: int) -> Iterator[Body]:
    for path, value in WRONG_TYPES.items():
        request: dict[str, Any] = {"ext": {"blob": _SLOT}}
        _set(request, path, value)
        yield Body(
            f"wrong_type_{path}",
            _fit(lambda n, r=request: _embed(r, _blob(_PAYLOADS["mixed"], n)), max_body),  # type: ignore[misc]
        )
    # every leaf at once (a path no other path extends)
    everything: dict[str, Any] = {"ext": {"blob": _SLOT}}
    for path, value in WRONG_TYPES.items():
        if not any(other.startswith((path + ".", path + "[]")) for other in WRONG_TYPES):
            _set(everything, path, value)
    for kind, item in _PAYLOADS.items():
        yield Body(
            f"wrong_types_all_{kind}",
            _fit(lambda n, i=item: _embed(everything, _blob(i, n)), max_body),  # type: ignore[misc]
        )


# --- surrogates, UTF-8, not JSON ------------------------------------------------------------


def _text(max_body: int) -> Iterator[Body]:
    yield Body("lone_surrogate_user.id", b'{"user":{"id":"U1\\ud800"}}')
    yield Body("lone_low_surrogate_user.id", b'{"user":{"id":"\\udc00"}}')
    yield Body("lone_surrogate_unknown", b'{"user":{"id":"u1"},"ext":{"x":"\\ud800"}}')
    yield Body(
        "lone_surrogate_consent",
        b'{"regs":{"gdpr":1},"user":{"id":"u1","consent":"' + CONSENTED.encode() + b'\\ud800"}}',
    )
    yield Body(
        "lone_surrogates_max_user.id",
        _fit(lambda n: b'{"user":{"id":"' + b"\\ud800" * n + b'"}}', max_body),
    )
    yield Body("surrogate_pair_user.id", b'{"user":{"id":"\\ud83d\\ude00"}}')
    yield Body("nul_escape_user.id", b'{"user":{"id":"a\\u0000b"}}')
    yield Body("invalid_utf8_user.id", b'{"user":{"id":"\xff\xfe"}}', json=False)
    yield Body("invalid_utf8_unknown", b'{"user":{"id":"u1"},"x":"\xc3\x28"}', json=False)
    yield Body("overlong_utf8_user.id", b'{"user":{"id":"\xc0\xaf"}}', json=False)
    yield Body("utf8_surrogate_bytes_user.id", b'{"user":{"id":"\xed\xa0\x80"}}', json=False)
    yield Body("nan_literal_regs.coppa", b'{"regs":{"coppa":NaN}}', json=False)
    yield Body("truncated_max", _fit(lambda n: b'{"user":{"id":"' + b"a" * n, max_body), json=False)


def hostile_bodies(max_body: int) -> list[Body]:
    """Every hostile body, each at most ``max_body`` bytes, names unique."""
    bodies = [
        *_strings(max_body), *_nesting(max_body), *_numbers(max_body), *_gpp(max_body),
        *_lists(max_body), *_duplicates(max_body), *_wrong_types(max_body), *_text(max_body),
    ]  # fmt: skip
    names = [b.name for b in bodies]
    if len(set(names)) != len(names):
        raise AssertionError("hostile body names repeat")
    # The fixed-count cases (10,000 eids, 100,000 imps) only fit a large max_body; past it
    # they are answered 413 before any decoding, and the ``*_max`` cases fill max_body.
    return [b for b in bodies if len(b.body) <= max_body]


# --- is it JSON? ----------------------------------------------------------------------------


def _reject(text: str) -> Any:
    raise ValueError(f"not JSON: {text}")


_WS: Final = r"[ \t\n\r]*"
_CLOSER: Final = {"[": "]", "{": "}"}
_TOKEN: Final = re.compile(
    _WS + r'(?:([\[{])|([\]}])|(,)|(:)|("(?:[^"\\\x00-\x1f]+|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*")'
    r"|(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null))"
)


def _grammar_ok(text: str) -> bool:
    """RFC 8259's grammar checked with an explicit stack (any depth)."""
    stack: list[str] = []
    expect = "value"  # value | value_or_close | key | key_or_close | colon | next | end
    pos = 0
    while True:
        match = _TOKEN.match(text, pos)
        if match is None:
            return expect == "end" and not text[pos:].strip(" \t\n\r")
        pos = match.end()
        opener, closer, comma, colon, string, scalar = match.groups()
        if closer:
            empty_ok = "value_or_close" if closer == "]" else "key_or_close"
            if not stack or _CLOSER[stack[-1]] != closer or expect not in ("next", empty_ok):
                return False
            stack.pop()
            expect = "next" if stack else "end"
        elif expect in ("value", "value_or_close"):
            if opener:
                stack.append(opener)
                expect = "key_or_close" if opener == "{" else "value_or_close"
            elif string or scalar:
                expect = "next" if stack else "end"
            else:
                return False
        elif expect in ("key", "key_or_close"):
            if not string:
                return False
            expect = "colon"
        elif expect == "colon" and colon:
            expect = "value"
        elif expect == "next" and comma:
            expect = "key" if stack[-1] == "{" else "value"
        else:
            return False


def is_json(body: bytes) -> bool:
    """Whether ``body`` is a JSON text (RFC 8259: UTF-8; numbers and depth unbounded)."""
    try:
        text = body.decode("utf-8")  # strict: lone surrogates as UTF-8 bytes are rejected too
    except UnicodeDecodeError:
        return False
    try:
        json.loads(text, parse_int=len, parse_float=len, parse_constant=_reject)
    except RecursionError:
        return _grammar_ok(text)
    except ValueError:
        return False
    return True


_NESTING_TOKEN: Final = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[{]|[\]}]')


def nesting_depth(body: bytes) -> int:
    """The deepest bracket nesting of ``body`` (strings skipped; any bytes accepted)."""
    depth = deepest = 0
    for token in _NESTING_TOKEN.findall(body):
        if token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


def answer_failure(body: bytes, error: BaseException | None) -> str | None:
    """Why the outcome of ``EnrichEndpoint.answer(body)`` breaks the contract, else ``None``.

    Allowed: an answer; ``msgspec.DecodeError`` (not its ``ValidationError``) for a body that is
    not JSON; ``openrtb.TooManySurrogateEscapes`` (a documented limit); ``RecursionError`` for
    a body nested deeper than the decoder follows (documented by ``openrtb.decode``, answered
    200 by the endpoint). Anything else is a failure, named by the exception's type (and
    message, without its JSON path).
    """
    if error is None or isinstance(error, openrtb.TooManySurrogateEscapes):
        return None
    if type(error) is msgspec.DecodeError:
        return None if not is_json(body) else f"DecodeError on JSON: {_plain(error)}"
    if isinstance(error, RecursionError) and nesting_depth(body) > decoder_depth_limit():
        return None
    return f"{type(error).__name__}: {_plain(error)}"


def _plain(error: BaseException) -> str:
    return str(error).split(" - at `", 1)[0][:120]
