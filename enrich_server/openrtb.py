"""The OpenRTB 2.x request, as far as enrich-server reads it.

The Structs below hold only the fields we use, so msgspec skips everything else without
building objects for it. Two decoding paths:

* **typed** (the hot path): ``msgspec.json.Decoder(BidRequest)`` in one C call;
* **lenient** (only after a ``ValidationError``): Index and other exchanges send fields of the
  wrong type now and then (``"user": {"id": 5}``, ``"eids": "x"``, ``"regs": "bad"``). Failing
  the whole request for one odd field would trip Index's circuit breaker, so we decode to
  plain Python values and keep every field that converts, dropping only the ones that don't.
  Leaves are converted with ``strict=False`` so ``"coppa": "1"`` still counts as a privacy
  signal instead of being silently lost.

The accessors at the end reconcile fields that moved between OpenRTB versions
(``imp.gpid``/``imp.ext.gpid``, ``regs.gdpr``/``regs.ext.gdpr``,
``regs.us_privacy``/``regs.ext.us_privacy``, ``user.consent``/``user.ext.consent``,
``user.eids``/``user.ext.eids``); the top-level placement wins when both are present.
"""

from __future__ import annotations

import functools
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Final, Union

import msgspec


class Uid(msgspec.Struct, gc=False):
    id: str | None = None


class Eid(msgspec.Struct):
    source: str | None = None
    uids: list[Uid] | None = None


class UserExt(msgspec.Struct):
    consent: str | None = None
    eids: list[Eid] | None = None


class User(msgspec.Struct):
    id: str | None = None
    eids: list[Eid] | None = None
    consent: str | None = None
    ext: UserExt | None = None


class Device(msgspec.Struct, gc=False):
    ifa: str | None = None
    lmt: int | None = None


class Site(msgspec.Struct, gc=False):
    domain: str | None = None


class App(msgspec.Struct, gc=False):
    bundle: str | None = None


class RegsExt(msgspec.Struct, gc=False):
    gdpr: int | None = None
    us_privacy: str | None = None


class Regs(msgspec.Struct):
    coppa: int | None = None
    gdpr: int | None = None
    us_privacy: str | None = None
    gpp: str | None = None
    gpp_sid: list[int] | None = None
    ext: RegsExt | None = None


class ImpExt(msgspec.Struct, gc=False):
    gpid: str | None = None


class Imp(msgspec.Struct):
    gpid: str | None = None
    ext: ImpExt | None = None


class BidRequest(msgspec.Struct):
    user: User | None = None
    device: Device | None = None
    site: Site | None = None
    app: App | None = None
    regs: Regs | None = None
    imp: list[Imp] | None = None


#: Limits on what we read from one request, where OpenRTB sets none (a hostile request may
#: carry thousands of eids or imps; real ones carry a handful). Past a limit the rest of the
#: list is ignored, never an error.
MAX_EID_UIDS: Final = 32  # (source, id) pairs read from user.eids and user.ext.eids together
MAX_IMPS: Final = 64  # imps whose gpid is read

_TYPED: Final = msgspec.json.Decoder(BidRequest)
_RAW_ITEMS: Final = msgspec.json.Decoder(list[msgspec.Raw])
_DROP: Final = object()
_EMPTY_RAW: Final = msgspec.Raw()
_HIGH: Final = rb"\\u[dD][89abAB][0-9a-fA-F]{2}"
_LOW: Final = rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}"
# A high surrogate escape not followed by a low one, or a low one not preceded by a high one.
# Both lookarounds are fixed-width, so ``sub`` runs in C with a literal replacement.
_LONE_SURROGATE: Final = re.compile(_HIGH + b"(?!" + _LOW + b")|(?<!" + _HIGH + b")" + _LOW)
_REPLACEMENT_TEMPLATE: Final = rb"\\ufffd"  # a template: its ``\\`` is one backslash
# An escaped backslash, masked while lone surrogates are replaced so that ``\\ud800`` (a
# backslash, then the text "ud800") is left alone; NUL bytes cannot occur in JSON text.
_ESCAPED_BACKSLASH: Final = b"\\\\"
_MASK: Final = b"\x00\x00"
#: The most ``\\ud...`` escapes (U+D000-U+DFFF: surrogates, paired or not, and a few Hangul
#: syllables) a body may carry for its lone surrogates to be repaired: the repair costs about
#: 0.15 us per escape, so a body of nothing else would take 1.6 ms. Past it the body is
#: refused with a message saying so.
MAX_SURROGATE_ESCAPES: Final = 1024


class TooManySurrogateEscapes(msgspec.DecodeError):
    """A body the decoder refused that has too many ``\\ud...`` escapes to look for lone
    surrogates among them (``MAX_SURROGATE_ESCAPES``): answered 400 like any non-JSON body."""


def decode(body: bytes) -> BidRequest:
    """Decode a request body; linear in its size, whatever it holds.

    Raises ``msgspec.DecodeError`` when the body is not JSON at all, and ``RecursionError``
    when it nests deeper than the decoder goes; every other oddity is tolerated. A lone
    UTF-16 surrogate escape (``"\\ud800"``: valid JSON grammar, but no Unicode text) reads
    as U+FFFD, as Go's encoding/json does, in a body of at most ``MAX_SURROGATE_ESCAPES``
    such escapes (``TooManySurrogateEscapes`` past it).
    """
    try:
        return _decode_tolerant(body)
    except msgspec.DecodeError as exc:
        if b"\\u" not in body or b"\x00" in body:
            raise  # no escape to repair, or not JSON either way
        masked = body.replace(_ESCAPED_BACKSLASH, _MASK)
        if masked.count(b"\\ud") + masked.count(b"\\uD") > MAX_SURROGATE_ESCAPES:
            raise TooManySurrogateEscapes(
                f"{exc} (if a lone UTF-16 surrogate escape is the cause: the body has more than"
                f" {MAX_SURROGATE_ESCAPES} \\ud... escapes, too many to repair)"
            ) from None
        repaired, count = _LONE_SURROGATE.subn(_REPLACEMENT_TEMPLATE, masked)
        if not count:
            raise
    return _decode_tolerant(repaired.replace(_MASK, _ESCAPED_BACKSLASH))


def _decode_tolerant(body: bytes) -> BidRequest:
    # The lenient path may meet a lone surrogate the typed decoder never reached (a wrong
    # type earlier in the body stops it first): its DecodeError goes to ``decode``'s repair.
    try:
        return _TYPED.decode(body)
    except msgspec.ValidationError:
        return decode_lenient(body)


def decode_lenient(body: bytes) -> BidRequest:
    """The lenient path alone: every field that converts is kept, the others dropped (what
    ``decode`` does once the typed decoder refused the body)."""
    converted = _converter(BidRequest)[1](body)
    return converted if isinstance(converted, BidRequest) else BidRequest()


# Moved fields, reconciled: the top-level placement wins when both are present.


def gdpr(regs: Regs | None) -> int | None:
    """``regs.gdpr``, else ``regs.ext.gdpr``."""
    if regs is None:
        return None
    if regs.gdpr is None and regs.ext is not None:
        return regs.ext.gdpr
    return regs.gdpr


def us_privacy(regs: Regs | None) -> str | None:
    """``regs.us_privacy``, else ``regs.ext.us_privacy``."""
    if regs is None:
        return None
    if regs.us_privacy is None and regs.ext is not None:
        return regs.ext.us_privacy
    return regs.us_privacy


def consent(user: User | None) -> str | None:
    """``user.consent``, else ``user.ext.consent`` (the TCF string)."""
    if user is None:
        return None
    if user.consent is None and user.ext is not None:
        return user.ext.consent
    return user.consent


def eids(user: User | None) -> list[tuple[str, str]]:
    """``(source, id)`` of the non-empty uids in ``user.eids``, then ``user.ext.eids``; the
    first ``MAX_EID_UIDS`` of them."""
    pairs: list[tuple[str, str]] = []
    if user is None:
        return pairs
    for group in (user.eids, user.ext.eids if user.ext is not None else None):
        if group:
            for eid in group:
                source = eid.source
                if source and eid.uids:
                    for uid in eid.uids:
                        if uid.id:
                            pairs.append((source, uid.id))
                            if len(pairs) == MAX_EID_UIDS:
                                return pairs
    return pairs


def gpids(imps: list[Imp] | None) -> list[str]:
    """Distinct non-empty ``imp.gpid`` (else ``imp.ext.gpid``) values of the first
    ``MAX_IMPS`` imps, in imp order."""
    out: list[str] = []
    if imps:
        for imp in imps[:MAX_IMPS]:
            gpid = imp.gpid
            if gpid is None and imp.ext is not None:
                gpid = imp.ext.gpid
            if gpid and gpid not in out:
                out.append(gpid)
    return out


#: Items of a list read by the lenient path; a list is never read further than the
#: accessors above look (``MAX_IMPS``, ``MAX_EID_UIDS``), whatever it holds.
MAX_LENIENT_ITEMS: Final = max(MAX_IMPS, MAX_EID_UIDS)

#: A value refused by the typed decoder is decoded whole once more (with conversions) only
#: up to this size; a larger one goes field by field, so a big subtree is not rebuilt at each
#: level on the way down to its one bad leaf.
MAX_RETRY_BYTES: Final = 4096

_Fallback = Callable[[bytes | msgspec.Raw], Any]


def _lenient(raw: bytes | msgspec.Raw, tp: Any) -> Any:
    """Convert the JSON ``raw`` to ``tp``, keeping what converts and dropping what doesn't.

    Returns ``_DROP`` when nothing of ``raw`` fits ``tp``. Only the fields we read are parsed
    (everything else is skipped as raw JSON), lists are read up to ``MAX_LENIENT_ITEMS``, and
    a large value is never decoded whole again, so the cost stays linear in the body
    whatever it nests or carries.
    """
    decoder, fallback = _converter(tp)
    if fallback is _drop or len(raw) <= MAX_RETRY_BYTES:  # a leaf, or a small container
        try:
            return decoder.decode(raw)
        except msgspec.ValidationError:  # a wrong type below, or an integer of 4,301+ digits
            pass
    return fallback(raw)


@functools.cache
def _converter(tp: Any) -> tuple[msgspec.json.Decoder[Any], _Fallback]:
    """For ``tp``: a decoder that also converts ``"1"`` to ``1`` and the like, and what to do
    with a value it refuses. Built once per type."""
    decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(tp, strict=False)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        members = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(members) == 1:
            return decoder, _converter(members[0])[1]
    elif origin is list:
        (item_type,) = typing.get_args(tp)
        return decoder, functools.partial(_lenient_list, item_type)
    elif isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return decoder, _struct_fallback(tp)
    return decoder, _drop


def _drop(_: bytes | msgspec.Raw) -> Any:
    return _DROP


def _lenient_list(item_type: Any, raw: bytes | msgspec.Raw) -> Any:
    try:
        items = _RAW_ITEMS.decode(raw)[:MAX_LENIENT_ITEMS]
    except msgspec.ValidationError:  # not an array
        return _DROP
    converted = (_lenient(item, item_type) for item in items)
    return [item for item in converted if item is not _DROP]


def _struct_fallback(tp: type[msgspec.Struct]) -> _Fallback:
    """Read ``tp``'s fields one by one from raw JSON: each field's value is captured
    unparsed, every other field skipped without building anything."""
    fields = msgspec.structs.fields(tp)
    mirror: msgspec.json.Decoder[Any] = msgspec.json.Decoder(
        msgspec.defstruct(
            f"Raw{tp.__name__}",
            [(f.name, msgspec.Raw, _EMPTY_RAW) for f in fields],
            rename={f.name: f.encode_name for f in fields},
        )
    )
    names = [(f.name, f.type) for f in fields]

    def fallback(raw: bytes | msgspec.Raw) -> Any:
        try:
            values = mirror.decode(raw)
        except msgspec.ValidationError:  # not an object
            return _DROP
        kwargs: dict[str, Any] = {}
        for name, field_type in names:
            value = getattr(values, name)
            if len(value):  # present (a JSON value is never empty)
                converted = _lenient(value, field_type)
                if converted is not _DROP:
                    kwargs[name] = converted
        return tp(**kwargs)

    return fallback
