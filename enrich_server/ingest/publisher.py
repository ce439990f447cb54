"""A command's entries on a replicated node (``ingest``, ``compact``): published to the log
from a one-off NATS connection, then waited for until the node's own store applied them, so
that the command ends once the node serves the change (the others within the propagation
bound)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Final

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api

from enrich_server.config import ReplicationConfig
from enrich_server.errors import StoreError, UnconfirmedWriteError
from enrich_server.store import SegmentStore

#: How long a command waits for the node's applier to apply what it published.
APPLY_WAIT_SECONDS: Final = 30.0
_POLL_SECONDS: Final = 0.05


#: Publishes of one entry (the same ``Nats-Msg-Id``) before it is given up as unconfirmed.
PUBLISH_ATTEMPTS: Final = 2


async def publish(
    js: JetStreamContext, config: ReplicationConfig, payload: bytes, msg_id: str
) -> int:
    """Publish one encoded entry under ``msg_id``, sent again with the same id (stored once)
    when no acknowledgement came; its stream sequence (the first copy's, when JetStream dropped
    this one as a duplicate). Raises ``StoreError`` when JetStream refused it (nothing
    stored), ``UnconfirmedWriteError`` when it may have been stored."""
    attempt = 1
    while True:
        try:
            ack = await js.publish(
                config.subject,
                payload,
                timeout=config.publish_timeout,
                stream=config.stream,
                headers={api.Header.MSG_ID.value: msg_id},
            )
            sequence: int = ack.seq
            return sequence
        except (nats.js.errors.NoStreamResponseError, nats.js.errors.APIError) as exc:
            raise StoreError(f"the replication log (NATS) refused it: {exc!r}") from None
        except (TimeoutError, nats.errors.Error) as exc:
            if attempt == PUBLISH_ATTEMPTS:
                raise UnconfirmedWriteError(
                    f"the replication log (NATS) did not acknowledge it ({exc!r}): it may"
                    " still be applied, and repeating it is safe"
                ) from None
            attempt += 1


async def applied(store: Path, sequence: int, wait: float = APPLY_WAIT_SECONDS) -> None:
    """Return once the node's store at ``store`` applied entry ``sequence``; ``StoreError``
    after ``wait`` seconds (the entry is in the log all the same: it will be applied)."""
    deadline = time.monotonic() + wait
    while True:
        opened = SegmentStore(store)  # anew each time: the node may swap generations
        try:
            if opened.applied_sequence() >= sequence:
                return
        finally:
            opened.close()
        if time.monotonic() > deadline:
            raise StoreError(
                f"published as log entry {sequence}, but the node serving {store} has not"
                f" applied it within {wait:g} s (is it running?): it will be"
            )
        await asyncio.sleep(_POLL_SECONDS)
