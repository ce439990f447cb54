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

import types
import typing
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


_TYPED: Final = msgspec.json.Decoder(BidRequest)
# float_hook: a number past float range (1e400) becomes inf instead of failing the decode.
_UNTYPED: Final = msgspec.json.Decoder(float_hook=float)
_DROP: Final = object()


def decode(body: bytes) -> BidRequest:
    """Decode a request body.

    Raises ``msgspec.DecodeError`` when the body is not JSON at all, and ``RecursionError``
    when it nests deeper than the decoder goes; every other oddity is tolerated.
    """
    try:
        return _TYPED.decode(body)
    except msgspec.ValidationError:
        converted = _lenient(_UNTYPED.decode(body), BidRequest)
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
    """``(source, id)`` of every non-empty uid in ``user.eids``, then ``user.ext.eids``."""
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
    return pairs


def gpids(imps: list[Imp] | None) -> list[str]:
    """Distinct non-empty ``imp.gpid`` (else ``imp.ext.gpid``) values, in imp order."""
    out: list[str] = []
    if imps:
        for imp in imps:
            gpid = imp.gpid
            if gpid is None and imp.ext is not None:
                gpid = imp.ext.gpid
            if gpid and gpid not in out:
                out.append(gpid)
    return out


def _lenient(value: Any, tp: Any) -> Any:
    """Convert ``value`` to ``tp``, keeping what converts and dropping what doesn't.

    Returns ``_DROP`` when nothing of ``value`` fits ``tp``.
    """
    try:
        return msgspec.convert(value, tp, strict=False)
    except msgspec.ValidationError:
        pass
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        members = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(members) == 1:
            return _lenient(value, members[0])
        return _DROP
    if origin is list:
        if not isinstance(value, list):
            return _DROP
        (item_type,) = typing.get_args(tp)
        items = (_lenient(item, item_type) for item in value)
        return [item for item in items if item is not _DROP]
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        if not isinstance(value, dict):
            return _DROP
        kwargs: dict[str, Any] = {}
        for field in msgspec.structs.fields(tp):
            if field.encode_name in value:
                converted = _lenient(value[field.encode_name], field.type)
                if converted is not _DROP:
                    kwargs[field.name] = converted
        return tp(**kwargs)
    return _DROP
