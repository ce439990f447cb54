"""DMP audience mutations: what a platform may push, validated whole, then applied in one
write transaction.

A mutation names one of the platform's own segments (created through the API) and a user,
by default our user id (``uid:``), else ``"idtype": "ifa"`` or ``"eid:<source>"``. Any bad
item rejects the whole batch, listing every bad item by index; nothing of it is applied.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Final, Literal

import msgspec

from enrich_server.keys import EID, IFA, MAX_KEY_BYTES, UID, parse_key
from enrich_server.store import StoreWriter

#: Longest TTL a mutation may ask for (ten years): anything longer is a unit mistake.
MAX_TTL: Final = 10 * 365 * 86400
#: How many bad items a rejected batch lists before summarising.
MAX_LISTED_PROBLEMS: Final = 100
ADD: Final = "add"
REMOVE: Final = "remove"
OPS: Final = (ADD, REMOVE)


class Mutation(msgspec.Struct, forbid_unknown_fields=True):
    """One item of a micro-batch (``POST /v1/segment`` with a JSON array body)."""

    segment: int
    userid: str
    op: Literal["add", "remove"] = ADD
    ttl: int | None = None
    idtype: str = UID


_UID_PREFIX: Final = (UID + ":").encode()
_BATCH_DECODER: Final = msgspec.json.Decoder(list[Mutation])
_ANY_DECODER: Final = msgspec.json.Decoder()


class BatchError(ValueError):
    """A batch (or single mutation) was refused; ``problems`` lists the bad items."""

    def __init__(self, problems: list[str], more: int = 0) -> None:
        self.problems = problems
        self.more = more
        super().__init__("; ".join(problems) + (f"; and {more} more" if more else ""))


def decode_batch(body: bytes, max_items: int) -> list[Mutation | str]:
    """Decode a micro-batch body: each item, or the string saying why it is malformed (so
    that a refusal can list every bad item). Raises ``BatchError`` when the body itself is
    wrong: not JSON, not an array, empty, or too long."""
    try:
        items: list[Mutation | str] = list(_BATCH_DECODER.decode(body))
    except msgspec.DecodeError:
        items = _itemwise(body)
    if not items:
        raise BatchError(["the batch is empty"])
    if len(items) > max_items:
        raise BatchError([f"the batch has {len(items)} items, more than {max_items}"])
    return items


def _itemwise(body: bytes) -> list[Mutation | str]:
    """The slow path of a batch that did not decode: item by item."""
    try:
        raw = _ANY_DECODER.decode(body)
    except msgspec.DecodeError as exc:
        raise BatchError([f"body is not JSON: {exc}"]) from None
    if not isinstance(raw, list):
        raise BatchError(["body must be a JSON array of {segment, userid[, op, ttl, idtype]}"])
    items: list[Mutation | str] = []
    for item in raw:
        try:
            items.append(msgspec.convert(item, Mutation))
        except msgspec.ValidationError as exc:
            items.append(str(exc))
    return items


def _capped(problems: list[str]) -> BatchError:
    return BatchError(problems[:MAX_LISTED_PROBLEMS], max(0, len(problems) - MAX_LISTED_PROBLEMS))


def user_key(userid: str, idtype: str) -> bytes:
    """The store key of a pushed user; raises ``ValueError`` saying what is wrong."""
    # isprintable() refuses every whitespace but the ASCII space, checked on its own.
    if not userid or not userid.isprintable() or " " in userid:
        raise ValueError(f"userid {userid!r} is empty or has spaces or control characters")
    if idtype == UID:
        # The common case, without parse_key's general work: a uid is taken as it is.
        key = _UID_PREFIX + userid.encode()
        if len(key) > MAX_KEY_BYTES:
            raise ValueError(f"key is longer than {MAX_KEY_BYTES} bytes")
        return key
    if idtype != IFA and not idtype.startswith(EID + ":"):
        raise ValueError(f"idtype {idtype!r} is not uid, ifa or eid:<source>")
    return parse_key(f"{idtype}:{userid}")


@dataclass(frozen=True, slots=True)
class Applied:
    """What a batch did: mutations applied, by op."""

    count: int
    ops: Counter[str]


Planned = list[tuple[bytes, int, bool, int]]


def plan_batch(
    owner_of: Callable[[int], int | None],
    platform: int,
    default_ttl: int,
    items: Sequence[Mutation | str],
    now: int,
) -> Planned:
    """Validate ``items`` (each segment must be the platform's own: ``owner_of(segment)`` is
    the platform owning it, ``None`` for none) into ``(key, segment, add, expires)`` in key
    order; raises ``BatchError`` listing every bad item, the malformed ones (``decode_batch``'s
    strings) included."""
    problems: list[str] = []
    owned: dict[int, bool] = {}
    planned: Planned = []
    default_expires = now + default_ttl if default_ttl else 0
    plan = planned.append
    for index, item in enumerate(items):
        if isinstance(item, str):
            problems.append(f"item {index}: {item}")
            continue
        sid = item.segment
        mine = owned.get(sid)
        if mine is None:
            mine = owned[sid] = owner_of(sid) == platform
        if not mine:
            problems.append(f"item {index}: segment {sid} is not a segment of this platform")
            continue
        ttl = item.ttl
        if ttl is None:
            expires = default_expires
        elif 0 <= ttl <= MAX_TTL:
            expires = now + ttl if ttl else 0
        else:
            problems.append(f"item {index}: ttl {ttl} is outside 0-{MAX_TTL} seconds")
            continue
        try:
            key = user_key(item.userid, item.idtype)
        except ValueError as exc:
            problems.append(f"item {index}: {exc}")
            continue
        plan((key, sid, item.op == ADD, expires))
    if problems:
        raise _capped(problems)
    # Neighbouring keys share B-tree pages: fewer pages touched per commit. A stable sort
    # on the key alone keeps a user's own mutations in the order they were sent.
    planned.sort(key=itemgetter(0))
    return planned


def plan_in(
    writer: StoreWriter,
    platform: int,
    default_ttl: int,
    items: Sequence[Mutation | str],
    now: int,
) -> Planned:
    """``plan_batch`` against the store as ``writer``'s transaction sees it."""

    def owner_of(sid: int) -> int | None:
        owner = writer.dmp_segment(sid)
        return None if owner is None else owner[0]

    return plan_batch(owner_of, platform, default_ttl, items, now)


def applied(planned: Planned) -> Applied:
    """What applying ``planned`` does, by op (the answer does not depend on the store)."""
    adds = sum(add for _, _, add, _ in planned)
    return Applied(len(planned), Counter({ADD: adds, REMOVE: len(planned) - adds}))


def apply_batch(
    writer: StoreWriter,
    platform: int,
    default_ttl: int,
    items: Sequence[Mutation | str],
    now: int = 0,
) -> Applied:
    """Validate ``items`` against the store (``plan_batch``, inside the write transaction),
    then apply them all, in key order; raises ``BatchError`` with nothing written."""
    planned = plan_in(writer, platform, default_ttl, items, now or int(time.time()))
    writer.apply_changes(planned)
    return applied(planned)
