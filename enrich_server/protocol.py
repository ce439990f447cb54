"""The HTTP/1.1 protocol ``serve`` runs: uvicorn's httptools protocol, hardened.

Three things plain uvicorn does not do, each a way for one caller to hurt every other caller
of a worker:

* **Read timeouts.** uvicorn only times out a connection that is idle after a response. A
  client that opens a connection and sends nothing, or trickles its headers (slowloris) or
  its body a byte at a time, would hold it forever. Each connection here carries a deadline
  for the phase it is in (waiting for a request, reading headers, reading the body); a sweep
  once per ``SWEEP_SECONDS`` closes those past it. Setting a deadline is one float store per
  phase, no timer per request.
* **A cap on idle connections per worker**: past ``max_idle_connections``, opening one more
  closes the longest-idle one (a keep-alive client reconnects; nobody in the middle of a
  request is cut).
* **Upgrade headers are ignored** (RFC 9110 section 7.8: a server may ignore them; we serve
  no other protocol). llhttp stops at the end of the headers of a request that asks for an
  upgrade and reports the rest of the stream as the new protocol's bytes, so uvicorn answered
  such a request (``curl --http2`` sends ``Upgrade: h2c``) with an empty body and never read
  what was pipelined after it. Here the rest is fed to a fresh parser, behind a synthetic head
  that carries the request's own framing, so its body and whatever follows are read as HTTP/1.1.

And one thing it does that no ASGI server can: a **fast lane** for the hot path. A POST to
the enrichment path (and to ``/ortb``, and a GET of ``/rtc``: each a ``FastLane``) is
answered inside the protocol, with no ASGI task, scope or message dicts: the body is
collected from the parser's callbacks, the answer computed synchronously by the same
``EnrichEndpoint.respond`` the ASGI route calls, and status line, headers and body leave in
one ``transport.write``. An explain call (``?explain=1``) takes the ASGI lane. A fast
request waits its turn behind ASGI requests pipelined before it (it then takes the ASGI
lane itself), so answers stay in request order. Each request is stamped when its first bytes
arrive (one clock read per ``data_received``): the overload guard ages it from there, and one
that has waited past its budget gets the empty answer before its body is decoded.

The limits travel from the app's lifespan to each connection in the lifespan state
(``CONNECTIONS_STATE_KEY``; the fast lane's endpoint: ``FAST_LANE_STATE_KEY``), the ASGI
way of sharing per-worker objects with the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

import httptools
from uvicorn.config import Config as UvicornConfig
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from enrich_server.config import ServerConfig
from enrich_server.enrich import NO_CACHE, Answer, EnrichEndpoint, Reply
from enrich_server.guard import clock

#: Where the lifespan state holds the worker's ``Connections``.
CONNECTIONS_STATE_KEY: Final = "enrich_server.connections"
#: ... and the ``FastLane`` tuple, tried in order.
FAST_LANE_STATE_KEY: Final = "enrich_server.fast_lanes"
#: How often deadlines are checked: a timeout fires up to this much late.
SWEEP_SECONDS: Final = 0.25
_NEVER: Final = math.inf
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_JSON_HEAD: Final = b"content-type: application/json\r\ncache-control: "
_CLOSE: Final = b"connection: close\r\n"
_clock: Final = clock


class FastLane:
    """One of the endpoint's paths as the protocol calls it: path, method, what answers it
    (from the body, or for ``GET`` from the query string), and the answer's bytes."""

    def __init__(
        self,
        path: str,
        method: str,
        endpoint: EnrichEndpoint,
        answer: Answer,
        empty: bytes,
        *,
        slow_query: bytes | None = None,
    ) -> None:
        self.path = path.encode()
        self.query_at = len(self.path)
        self.method = method.encode()
        self.from_query = method == "GET"
        self.endpoint = endpoint
        self.answer = answer
        self.empty = empty  # the answer without segments, in the caller's shape
        self._slow_query = slow_query  # a query parameter that sends the call to ASGI
        self._defaults: list[tuple[bytes, bytes]] | None = None
        self._default_lines = b""
        self._empty_response = b""  # the keep-alive answer without segments, whole

    def matches(self, url: bytes) -> bool:
        """Whether a request target is the lane's path, with or without a query (and none
        holding its ``slow_query``)."""
        if url == self.path:
            return True
        return (
            url.startswith(self.path)
            and url[self.query_at] == 0x3F
            and (self._slow_query is None or self._slow_query not in url)
        )

    def query(self, url: bytes) -> bytes:
        """The query string of a target this lane matches."""
        return url[self.query_at + 1 :] if len(url) > self.query_at else b""

    def encode(
        self, reply: Reply, default_headers: list[tuple[bytes, bytes]], close: bool
    ) -> bytes:
        """The whole HTTP/1.1 response for ``reply``, headers as uvicorn writes them."""
        if default_headers is not self._defaults:  # uvicorn renews the list (Date) each second
            self._default_lines = b"".join(n + b": " + v + b"\r\n" for n, v in default_headers)
            self._defaults = default_headers
            self._empty_response = b"".join(
                (STATUS_LINE[200], self._default_lines, _JSON_HEAD, NO_CACHE,
                 b"\r\ncontent-length: %d\r\n\r\n" % len(self.empty), self.empty)
            )  # fmt: skip
        status, cache, body, extra = reply
        # Every shed call and every miss, built once a second. Identity checks suffice: an
        # equal answer built elsewhere takes the general path, to the same bytes.
        if body is self.empty and cache is NO_CACHE and status == 200 and not close and not extra:
            return self._empty_response
        parts = [STATUS_LINE[status], self._default_lines, _JSON_HEAD, cache,
                 b"\r\ncontent-length: %d\r\n" % len(body)]  # fmt: skip
        if extra:
            parts.extend(n + b": " + v + b"\r\n" for n, v in extra)
        if close:
            parts.append(_CLOSE)
        parts.append(b"\r\n")
        parts.append(body)
        return b"".join(parts)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """How long a client may take, and how many idle connections a worker keeps."""

    idle_timeout: float  # connected (or after a response), no request started
    header_timeout: float  # first byte of a request to the end of its headers
    body_timeout: float  # end of the headers to the end of the body
    max_idle_connections: int

    @classmethod
    def of(cls, server: ServerConfig) -> ConnectionLimits:
        """The limits ``[server]`` sets."""
        return cls(
            idle_timeout=server.keepalive_timeout,
            header_timeout=server.header_timeout,
            body_timeout=server.body_timeout,
            max_idle_connections=server.max_idle_connections,
        )


class Connections:
    """A worker's open connections: their deadlines, swept, and the idle ones, capped."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open: set[EnrichHttpProtocol] = set()
        # Insertion order is idleness order: the first entry has been idle longest.
        self.idle: OrderedDict[EnrichHttpProtocol, None] = OrderedDict()
        self.timed_out = 0
        self.evicted = 0
        self._sweeper: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Connections:
        """Start sweeping deadlines (on the running loop) until the block ends."""
        self._sweeper = asyncio.create_task(self._sweep_forever())
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    def became_idle(self, connection: EnrichHttpProtocol) -> None:
        """``connection`` waits for a request; close the longest-idle one past the cap."""
        self.idle[connection] = None
        if len(self.idle) > self.limits.max_idle_connections:
            oldest, _ = self.idle.popitem(last=False)
            self.evicted += 1
            oldest.close()

    def sweep(self, now: float) -> None:
        """Close every connection past its deadline."""
        expired = [c for c in self.open if c.deadline < now]
        for connection in expired:
            self.timed_out += 1
            connection.close()

    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            self.sweep(loop.time())


class EnrichHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with read deadlines, an idle cap and Upgrade ignored."""

    def __init__(
        self,
        config: UvicornConfig,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        registry = app_state.get(CONNECTIONS_STATE_KEY)
        # None only for an app without our lifespan (embedding): plain uvicorn behaviour.
        self._registry: Connections | None = registry
        self.deadline = _NEVER
        self._reading = False  # between a request's first byte and its last
        self._upgrade_framing: bytes | None = None  # set while an ignored upgrade is resumed
        self._replaying_head = False
        self._lanes: tuple[FastLane, ...] | None = app_state.get(FAST_LANE_STATE_KEY)
        self._fast = False  # the request being read is answered here, not by ASGI
        self._active: FastLane = None  # type: ignore[assignment]  # set while _fast
        self._fast_chunks: list[bytes] = []
        self._fast_size = 0
        self._fast_answered = False  # answered before its body ended (413, 401): discard
        self._fast_keep_alive = True
        self._read_at = 0.0  # when the loop last read bytes from this connection
        self._stamp = 0.0  # when the first bytes of the request being read arrived
        self._paused_for_writes = False

    # Deadlines and idleness.

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        registry = self._registry
        if registry is not None:
            registry.open.add(self)
            self.deadline = self.loop.time() + registry.limits.idle_timeout
            registry.became_idle(self)

    def connection_lost(self, exc: Exception | None) -> None:
        registry = self._registry
        if registry is not None:
            registry.open.discard(self)
            registry.idle.pop(self, None)
        super().connection_lost(exc)

    def close(self) -> None:
        """Close the connection (a deadline passed, or evicted as the longest idle)."""
        self.deadline = _NEVER
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def on_message_begin(self) -> None:
        if self._replaying_head:
            return
        self._stamp = self._read_at  # the guard ages the request from here
        if self._lanes is None:
            super().on_message_begin()
        else:  # the ASGI scope is built in on_headers_complete, for the ASGI lane only
            self.url = b""
            self.expect_100_continue = False
            self.headers = []
        self._reading = True
        registry = self._registry
        if registry is not None:
            registry.idle.pop(self, None)
            self.deadline = self.loop.time() + registry.limits.header_timeout

    def on_url(self, url: bytes) -> None:
        if not self._replaying_head:
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._replaying_head:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._replaying_head:
            self._replaying_head = False  # the body that follows is the upgraded request's
            return
        lanes = self._lanes
        if lanes is not None:
            lane = self._fast_lane(lanes)
            if lane is not None:
                self._begin_fast(lane)
                return
            url, headers, expect = self.url, self.headers, self.expect_100_continue
            super().on_message_begin()  # the scope, deferred until the lane was known
            self.url, self.headers, self.expect_100_continue = url, headers, expect
            self.scope["headers"] = headers
        super().on_headers_complete()
        if self.parser.should_upgrade():
            self._upgrade_framing = _framing(self.headers)
        registry = self._registry
        if registry is not None:
            self.deadline = self.loop.time() + registry.limits.body_timeout

    def on_body(self, body: bytes) -> None:
        if not self._fast:
            super().on_body(body)
            return
        if self._fast_answered:
            return
        self._fast_size += len(body)
        endpoint = self._active.endpoint
        if self._fast_size > endpoint.max_body:  # answered now, the rest never buffered
            self._fast_chunks = []
            self._answer_fast(endpoint.too_large(self._stamp))
            return
        self._fast_chunks.append(body)

    def on_message_complete(self) -> None:
        if self._upgrade_framing is not None:
            return  # llhttp stopped at the headers: the body is still to be read
        if self._fast:
            self._fast = False
            self._reading = False
            self.deadline = _NEVER
            if self._fast_answered:
                self._fast_answered = False
                return
            lane = self._active
            chunks = self._fast_chunks
            self._fast_chunks = []
            if lane.from_query:
                data = lane.query(self.url)
            else:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self._answer_fast(lane.endpoint.respond(data, self._stamp, lane.answer, lane.empty))
            return
        super().on_message_complete()
        self._reading = False
        self.deadline = _NEVER  # the app's turn; after the response, uvicorn's keep-alive

    def on_response_complete(self) -> None:
        super().on_response_complete()
        registry = self._registry
        waiting = not self._reading and (self.cycle is None or self.cycle.response_complete)
        if registry is not None and waiting and not self.transport.is_closing():
            registry.became_idle(self)

    # The fast lane.

    def _fast_lane(self, lanes: tuple[FastLane, ...]) -> FastLane | None:
        """The lane answering the request whose headers just ended, if one does."""
        if self.parser.should_upgrade() or self.pipeline:
            return None
        if self.cycle is not None and not self.cycle.response_complete:
            return None  # an ASGI call ahead: answers stay in order
        method, url = self.parser.get_method(), self.url
        for lane in lanes:
            if method == lane.method and lane.matches(url):
                return lane
        return None

    def _begin_fast(self, lane: FastLane) -> None:
        self._fast = True
        self._active = lane
        self._fast_size = 0
        self._fast_keep_alive = (
            self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        )
        registry = self._registry
        if registry is not None:
            self.deadline = self.loop.time() + registry.limits.body_timeout
        endpoint = lane.endpoint
        if endpoint.has_auth:
            query = lane.query(self.url)
            scope = {"headers": self.headers, "query_string": query, "client": self.client}
            refusal = endpoint.refuse(scope)
            if refusal is not None:  # before the body, as the ASGI lane does
                endpoint.tally.request(refusal[0], _clock() - self._stamp)
                self._answer_fast(refusal)
                return
        if self.expect_100_continue:
            self.transport.write(_CONTINUE)

    def _answer_fast(self, reply: Reply) -> None:
        """Write the whole response at once; then the connection is ready for the next."""
        self._fast_answered = self._reading  # still reading: the rest of the body is discarded
        close = not self._fast_keep_alive
        lane = self._active
        lane.endpoint.tally.fast_lane += 1
        transport = self.transport
        transport.write(lane.encode(reply, self.server_state.default_headers, close))
        if close:
            transport.close()
            return
        self._fast_response_complete()
        if self.flow.write_paused and not self._paused_for_writes:
            # The client stops reading: read no more requests until it catches up.
            self._paused_for_writes = True
            self.flow.pause_reading()

    def _fast_response_complete(self) -> None:
        """uvicorn's ``on_response_complete`` for a fast answer, the connection's idle deadline
        in place of uvicorn's keep-alive timer: a ``call_later`` per answer and its
        ``cancel`` on the next request cost 1.6-2.3 us (a shed answer's whole cost is a few
        times that). Nothing is pipelined behind a fast request (``_fast_lane``)."""
        registry = self._registry
        if registry is None:
            self.on_response_complete()
            return
        self.server_state.total_requests += 1
        if self.transport.is_closing():  # as uvicorn's: nothing more to read or wait for
            return
        self.flow.resume_reading()
        if not self._reading:
            self.deadline = self.loop.time() + registry.limits.idle_timeout
            registry.became_idle(self)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._paused_for_writes:
            self._paused_for_writes = False
            self.flow.resume_reading()

    def shutdown(self) -> None:
        if self._fast:  # a request still arriving: answer it, then close
            self._fast_keep_alive = False
        else:
            super().shutdown()

    # Upgrade ignored.

    def _should_upgrade(self) -> bool:
        return False  # no WebSocket (or other protocol) is served here

    def data_received(self, data: bytes) -> None:
        self._read_at = _clock()  # one clock read per socket read, shared by what it holds
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade as upgrade:
            self._resume_after_upgrade(data[upgrade.args[0] :])

    def _resume_after_upgrade(self, rest: bytes) -> None:
        """Read ``rest`` (the body of the request that asked for an upgrade, and anything
        pipelined after it) with a fresh parser, as HTTP/1.1."""
        framing = self._upgrade_framing or b"content-length: 0\r\n"
        self._upgrade_framing = None
        self.parser = httptools.HttpRequestParser(self)
        with contextlib.suppress(AttributeError):  # httptools < 0.6.3, as uvicorn does
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self._replaying_head = True
        self.data_received(b"POST / HTTP/1.1\r\n" + framing + b"\r\n" + rest)


def _framing(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The header that frames a request's body, as a header line to hand a fresh parser."""
    for name, value in headers:
        if name == b"transfer-encoding" and b"chunked" in value.lower():
            return b"transfer-encoding: chunked\r\n"
    for name, value in headers:
        if name == b"content-length":
            return b"content-length: " + value + b"\r\n"
    return b"content-length: 0\r\n"
