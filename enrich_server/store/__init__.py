"""The segment store: memberships of identity keys in segments, on LMDB.

``layout`` owns the tables, the value encoding and how an environment is opened; ``reader``
what workers serve from (``SegmentStore``); ``writer`` the write sessions (``StoreWriter``).
The names below are the package's public API.
"""

from enrich_server.store.layout import (
    CURRENT_LINK,
    DATA_FILE,
    DEFAULT_MAP_SIZE,
    MAX_SEGMENT_ID,
    Meta,
    Tables,
    decode_memberships,
    encode_memberships,
    open_environment,
    pack_segment_id,
    store_dir,
    unpack_segment_id,
    value_header,
    value_int,
)
from enrich_server.store.reader import DmpSegment, Resolved, SegmentStore, StoreStats, StoreView
from enrich_server.store.writer import StoreWriter, publish_with_dmp_state

__all__ = [
    "CURRENT_LINK",
    "DATA_FILE",
    "DEFAULT_MAP_SIZE",
    "MAX_SEGMENT_ID",
    "DmpSegment",
    "Meta",
    "Resolved",
    "SegmentStore",
    "StoreStats",
    "StoreView",
    "StoreWriter",
    "Tables",
    "decode_memberships",
    "encode_memberships",
    "open_environment",
    "pack_segment_id",
    "publish_with_dmp_state",
    "store_dir",
    "unpack_segment_id",
    "value_header",
    "value_int",
]
