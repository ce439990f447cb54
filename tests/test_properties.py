"""Property tests (hypothesis) of the request path: decode, keys, privacy, and the store's
merge, cap and TTL, each against a plain model of what it must do."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enrich_server.keys import CONTEXT_NAMESPACES, MAX_KEY_BYTES, USER_NAMESPACES, request_keys
from enrich_server.openrtb import MAX_EID_UIDS, MAX_IMPS, BidRequest, decode, decode_lenient
from enrich_server.privacy import PrivacyPolicy, suppression_reason
from enrich_server.snapshot import load_snapshots
from enrich_server.store import SegmentStore

# A shared VM is slow now and then: judge the properties, not the machine's speed.
QUIET = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any JSON value, small.
_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def _field(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a value of the right shape, sometimes anything at all."""
    return st.one_of(good, good, good, json_values)


def _obj(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional={k: _field(v) for k, v in fields.items()})


_ids = st.text(max_size=12) | st.text(alphabet="0-", max_size=5)
_small_int = st.integers(min_value=-2, max_value=3)
_uids = st.lists(_obj(id=_ids), max_size=3)
_eids = st.lists(_obj(source=_ids, uids=_uids), max_size=3)
_regs_ext = _obj(gdpr=_small_int, us_privacy=st.sampled_from(["1YNN", "1NNN", "1---", "x"]))
requests = _obj(
    user=_obj(id=_ids, eids=_eids, consent=_ids, ext=_obj(consent=_ids, eids=_eids)),
    device=_obj(ifa=_ids, lmt=_small_int),
    site=_obj(domain=_ids),
    app=_obj(bundle=_ids),
    regs=_obj(
        coppa=_small_int,
        gdpr=_small_int,
        us_privacy=st.sampled_from(["1YNN", "1NYN", "1---", ""]),
        gpp=_ids,
        gpp_sid=st.lists(_small_int, max_size=3),
        ext=_regs_ext,
    ),
    imp=st.lists(_obj(gpid=_ids, ext=_obj(gpid=_ids)), max_size=3),
)


@QUIET
@given(requests)
def test_decode_never_fails_on_json_and_lenient_agrees_with_typed(request: dict[str, Any]) -> None:
    body = msgspec.json.encode(request)
    decoded = decode(body)
    assert isinstance(decoded, BidRequest)
    try:
        typed = msgspec.json.decode(body, type=BidRequest)
    except msgspec.ValidationError:
        return
    assert decode_lenient(body) == typed == decoded


@QUIET
@given(st.binary(max_size=200))
def test_decode_of_any_bytes_answers_or_says_not_json(body: bytes) -> None:
    with contextlib.suppress(msgspec.DecodeError):
        assert isinstance(decode(body), BidRequest)


@QUIET
@given(requests)
def test_keys_are_namespaced_bounded_distinct_and_in_their_list(request: dict[str, Any]) -> None:
    user, context = request_keys(decode(msgspec.json.encode(request)))
    for keys, namespaces in ((user, USER_NAMESPACES), (context, CONTEXT_NAMESPACES)):
        assert len(keys) == len(set(keys))
        for key in keys:
            namespace, sep, ident = key.decode().partition(":")
            assert sep
            assert ident
            assert namespace in namespaces
            assert len(key) <= MAX_KEY_BYTES
    assert len(user) <= MAX_EID_UIDS + 2  # uid, the eids read, ifa
    assert len(context) <= MAX_IMPS + 2  # domain, bundle, the gpids read


@QUIET
@given(requests)
def test_privacy_never_fails_and_coppa_always_withholds(request: dict[str, Any]) -> None:
    policy = PrivacyPolicy()
    reason = suppression_reason(decode(msgspec.json.encode(request)), policy)
    assert reason is None or isinstance(reason, str)
    regs = request.get("regs")
    regs = {**regs, "coppa": 1} if isinstance(regs, dict) else {"coppa": 1}
    assert suppression_reason(decode(msgspec.json.encode({**request, "regs": regs})), policy)


NOW = 1_800_000_000
_segment = st.sampled_from([f"s{i}" for i in range(12)])
_expiry = st.sampled_from([0, NOW - 10, NOW, NOW + 5, NOW + 100, NOW + 86_400])
memberships = st.dictionaries(
    st.sampled_from([f"uid:u{i}" for i in range(6)] + ["domain:d.example"]),
    st.tuples(st.lists(_segment, min_size=1, max_size=6, unique=True), _expiry),
    min_size=1,
    max_size=7,
)


@settings(QUIET, max_examples=40)
@given(memberships, st.lists(st.sampled_from([f"uid:u{i}" for i in range(8)]), max_size=6),
       st.integers(min_value=1, max_value=15))  # fmt: skip
def test_resolve_merges_dedupes_caps_and_drops_expired(
    data: dict[str, tuple[list[str], int]], asked: list[str], limit: int
) -> None:
    keys = list(dict.fromkeys([*asked, "domain:d.example"]))
    # The model: keys in order, live memberships only, first occurrence wins, then the cap.
    live = [
        (segment, expires)
        for key in keys
        if key in data
        for segment in data[key][0]
        for expires in [data[key][1]]
        if expires == 0 or expires > NOW
    ]
    expected = list(dict.fromkeys(segment for segment, _ in live))[:limit]
    expiring = [expires for _, expires in live if expires]
    with tempfile.TemporaryDirectory() as folder:
        snapshot = Path(folder) / "s.tsv"
        snapshot.write_text(
            "".join(
                f"{key}\t{','.join(segments)}" + (f"\t{expires}" if expires else "") + "\n"
                for key, (segments, expires) in data.items()
            )
        )
        load_snapshots([snapshot], Path(folder) / "store", progress=False)
        store = SegmentStore(Path(folder) / "store")
        try:
            resolved = store.resolve([k.encode() for k in keys], NOW, limit)
        finally:
            store.close()
    assert [msgspec.json.decode(s) for s in resolved.segments_json] == expected
    assert resolved.hits == sum(key in data for key in keys)
    assert resolved.min_expires == (min(expiring) if expiring else 0)
