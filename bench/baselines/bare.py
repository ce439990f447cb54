"""The throughput ceiling: a plain ASGI callable that reads the body and answers a constant.

No framework, no parsing, no lookup: whatever enrich-server costs above this is its own work.

    uvicorn bench.baselines.bare:app --loop uvloop --http httptools --no-access-log
"""

from __future__ import annotations

from typing import Final

from starlette.types import Message, Receive, Scope, Send

BODY: Final = b'{"segment_ids":[]}'

# Built once: ASGI servers only read the messages they are sent.
_START: Final[Message] = {
    "type": "http.response.start",
    "status": 200,
    "headers": [
        (b"content-type", b"application/json"),
        (b"cache-control", b"no-cache"),
        (b"content-length", b"%d" % len(BODY)),
    ],
}
_BODY: Final[Message] = {"type": "http.response.body", "body": BODY}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answer every HTTP request ``200`` with ``BODY``; acknowledge lifespan events."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return  # websockets: refused by returning without accepting
    # Drain the body like a real endpoint would; the server's flow control depends on it.
    message = await receive()
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            return
    await send(_START)
    await send(_BODY)


async def _lifespan(receive: Receive, send: Send) -> None:
    # The server sends startup, then shutdown; each is acknowledged and the loop ends after
    # shutdown, so this is bounded by the server's own lifetime.
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
