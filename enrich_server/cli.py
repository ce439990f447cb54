"""The ``enrich-server`` command line: serve, load, lookup, stats, ingest, digest and the other
tools.

Exit codes: 0 success, 1 the job failed (bad snapshot, unreadable store), 2 bad usage or
configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import functools
import itertools
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import msgspec
import uvicorn
import uvloop

from enrich_server import __version__
from enrich_server.app import (
    CONFIG_HANDOFF_VARIABLE,
    INGEST_SOCKET_VARIABLE,
    enrich_endpoint,
    privacy_policy,
)
from enrich_server.capture import read_capture
from enrich_server.check import format_report, parse_target, read_bodies, run_check
from enrich_server.config import (
    EXAMPLE_STORE,
    SAMPLES_DIR,
    Config,
    PlatformConfig,
    load_config,
    options,
    to_json,
)
from enrich_server.consent_explain import explain as explain_consent
from enrich_server.digest import store_digest
from enrich_server.errors import ConfigError, EnrichError, SnapshotError
from enrich_server.explain import explain_call
from enrich_server.generations import remove_dead_builds
from enrich_server.guard import clock
from enrich_server.ingest import (
    checkpoints,
    replicated_compaction,
    replicated_dropfiles,
    replicated_snapshots,
)
from enrich_server.ingest.dropfiles import (
    DEFAULT_SETTLE_SECONDS,
    FileResult,
    apply_file,
    process_ready,
)
from enrich_server.ingest.local import Supervisor
from enrich_server.keys import NAMESPACES, parse_key
from enrich_server.log import redacted, setup_logging
from enrich_server.metrics import MULTIPROC_ENV
from enrich_server.protocol import EnrichHttpProtocol
from enrich_server.replay import DEFAULT_RATE, replay
from enrich_server.replay import format_report as format_replay
from enrich_server.snapshot import export_lines, load_snapshots
from enrich_server.store import DATA_FILE, SegmentStore, StoreWriter, store_dir
from enrich_server.tempdirs import INGEST_PREFIX, METRICS_PREFIX, remove_abandoned
from enrich_server.tempdirs import owned as owned_tempdir

log = logging.getLogger("enrich_server")

EXIT_FAILED = 1
EXIT_USAGE = 2


def _options_epilog() -> str:
    lines = ["configuration (TOML key, environment variable, default):"]
    for key, env, default, doc in options():
        shown = "example store" if key == "server.store" else repr(default)
        lines.append(f"  {key:<18} {env:<26} {shown}\n      {doc}")
    lines.append("precedence: defaults < --config file < ENRICH_* variables < flags")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="enrich-server",
        description="Real-time data partner server: answers Index Exchange enrichment "
        "calls with audience segments from an LMDB store.",
    )
    parser.add_argument("--version", action="version", version=f"enrich-server {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    serve = commands.add_parser(
        "serve",
        help="serve POST /enrich, /healthz and /readyz",
        description="Serve the enrichment endpoint. Without --store, serves the bundled "
        "example store.",
        epilog=_options_epilog(),
        formatter_class=raw,
    )
    serve.add_argument("--config", type=Path, help="TOML configuration file")
    serve.add_argument("--store", help="segment store directory")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port (default 8080)")
    serve.add_argument("--workers", type=int, help="worker processes sharing port and store")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))

    _add_load_parser(commands)

    lookup = commands.add_parser(
        "lookup",
        help="show what identity keys resolve to",
        description="Print, one JSON object a line, the memberships of each KEY "
        "(expired ones included, with their expiry).",
    )
    lookup.add_argument("keys", nargs="+", metavar="KEY", help="e.g. uid:AbcdEfgHijklmnoP")
    lookup.add_argument("--store", type=Path, default=EXAMPLE_STORE, help="store directory")

    stats = commands.add_parser(
        "stats",
        help="counts, sizes and age of a store",
        description="Scan a store and report identities per namespace, segment sizes, "
        "file size and snapshot age.",
    )
    stats.add_argument("--store", type=Path, default=EXAMPLE_STORE, help="store directory")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.add_argument("--top", type=int, default=20, help="segments listed (default 20)")

    _add_replication_parsers(commands)

    export = commands.add_parser(
        "export",
        help="write a store back out as a snapshot (TSV)",
        description="Write every membership of a store as snapshot lines (expired ones "
        "included, with their expiry); loading the output into an empty store rebuilds it.",
    )
    export.add_argument("--store", type=Path, default=EXAMPLE_STORE, help="store directory")
    export.add_argument("--out", type=Path, help="output file (default: standard output)")

    segments = commands.add_parser(
        "segments",
        help="list segments with their member counts",
        description="One line per segment: name, then members (identity keys), tab-separated, "
        "largest first.",
    )
    segments.add_argument("--store", type=Path, default=EXAMPLE_STORE, help="store directory")

    _add_compact_parser(commands)
    _add_ingest_parser(commands)

    consent = commands.add_parser(
        "consent",
        help="explain the privacy decision on a TCF v2 or GPP string, field by field",
        description="Decode a TCF v2 consent string (user.consent) or a GPP string (regs.gpp) "
        "and explain, field by field, whether the configured privacy policy lets us serve "
        "user-level segments with it (exit 1 if not).",
    )
    consent.add_argument("string", metavar="TC_OR_GPP_STRING")
    consent.add_argument(
        "--gpp-sid", type=_section_ids, metavar="7,8",
        help="the request's regs.gpp_sid (default: every section of the string applies)",
    )  # fmt: skip
    consent.add_argument("--config", type=Path, help="TOML configuration ([privacy] section)")

    explain = commands.add_parser(
        "explain",
        help="why a request gets the answer it gets (keys, aliases, TTLs, privacy, cache)",
        description="Answer BODY (an OpenRTB request as Index sends it; - for standard input) "
        "from a store as POST /enrich would, and print the answer with an explain object: "
        "each identity key and the fields that gave none, alias resolution, what each key "
        "holds with remaining TTLs, each segment's source key, the privacy rule that withheld "
        "user-level segments and the field that decided it, the holdout and the Cache-Control "
        "reason. The same as POST /enrich?explain=1 on a running server.",
    )
    explain.add_argument("body", metavar="BODY.json", help="request body file, or -")
    explain.add_argument("--store", type=Path, default=EXAMPLE_STORE, help="store directory")
    explain.add_argument("--config", type=Path, help="TOML configuration ([privacy], [enrich])")

    check = commands.add_parser(
        "check",
        help="would Index's circuit breaker trip on an endpoint?",
        description="Send a bounded, open-loop stream of real request bodies to URL at a fixed "
        "rate and report status codes, latency percentiles (measured from each request's due "
        "time) and the share of calls over 5 ms, with a verdict: Index throttles a partner on "
        "any 4xx/5xx or when more than 5%% of calls exceed 5 ms. Exit code 1 when it would trip.",
    )
    check.add_argument("url", metavar="URL", help="e.g. http://127.0.0.1:8080/enrich")
    check.add_argument("--rate", type=float, default=200.0, help="requests per second (200)")
    check.add_argument("--duration", type=float, default=10.0, help="seconds to send (10)")
    check.add_argument("--connections", type=int, default=32, help="connection pool (32)")
    check.add_argument("--timeout", type=float, default=1.0, help="per-request timeout, s (1)")
    check.add_argument(
        "--bodies",
        type=Path,
        nargs="+",
        default=[SAMPLES_DIR],
        help="request bodies: .json files, directories of them, or files with one body a "
        "line (default: the seed's sample requests)",
    )
    check.add_argument(
        "--header", action="append", default=[], metavar="'NAME: VALUE'", help="extra header"
    )
    check.add_argument("--json", action="store_true", help="machine-readable output")
    _add_replay_parser(commands)
    return parser


def _add_load_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    load = commands.add_parser(
        "load",
        help="build or update a store from snapshot files (all or nothing)",
        description="Apply snapshot files (TSV, optionally gzip-compressed) to a store, "
        "creating it when missing. Each line: KEY<TAB>SEG[,SEG...][<TAB>EXPIRES]; a segment "
        "written -SEG removes that membership. The whole load is one transaction: any bad "
        "line is reported as FILE:LINE: why and nothing is applied.",
        epilog=f"key namespaces: {', '.join(n + ':' for n in NAMESPACES)}",
    )
    load.add_argument("snapshots", nargs="+", type=Path, metavar="SNAPSHOT")
    load.add_argument("--store", type=Path, required=True, help="store directory")
    load.add_argument(
        "--replace",
        action="store_true",
        help="build a new store from the snapshots alone and swap it in whole (running "
        "servers follow within 2 s); without it the snapshots are a delta",
    )
    load.add_argument("--quiet", action="store_true", help="no progress output")
    load.add_argument(
        "--config",
        type=Path,
        help="a replicated node's configuration: with --replace, the new store is uploaded to "
        "the [replication] bucket and every node swaps it in, keeping its DMP state",
    )


def _add_compact_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    compact = commands.add_parser(
        "compact",
        help="drop expired memberships (safe while serving)",
        description="Remove every membership whose expiry has passed, and identity keys left "
        "with none, in one transaction; running servers keep answering from their snapshot "
        "meanwhile and see the result on their next request. With a replicated --config, "
        "--store is the node's own store: the compaction is published to the replication log "
        "in slices of keys, and every node applies each one; the command returns once this "
        "node applied the last.",
    )
    compact.add_argument("--store", type=Path, required=True, help="store directory")
    compact.add_argument("--config", type=Path, help="a replicated node's configuration")


def _add_replication_parsers(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """``digest`` (compares replicas) and ``checkpoint`` (starts new ones)."""
    _add_digest_parser(commands)
    _add_checkpoint_parser(commands)


def _add_digest_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    digest = commands.add_parser(
        "digest",
        help="applied replication sequence and a hash of everything a store serves",
        description='Print one JSON line, {"sequence": N, "digest": "HEX"}: the last '
        "replication log entry applied (0 on a single node) and an order-independent hash of "
        "what the store serves (memberships with their expiries, segments, DMP segments, "
        "synced ids, applied drop files; not its build times or write count). Replicas at the "
        "same sequence print the same digest; both are read in one transaction, so a store "
        "being written to still gives a matching pair. With --parts, also each table's count "
        "and hash, to see where two replicas differ.",
    )
    digest.add_argument("--store", type=Path, required=True, help="store directory")
    digest.add_argument("--parts", action="store_true", help="add each table's count and hash")


def _add_checkpoint_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    checkpoint = commands.add_parser(
        "checkpoint",
        help="upload a replicated node's store to the object store, for new nodes to start from",
        description="Copy the store of a replicated node ([server] store; safe while it serves), "
        "compacted, from one read transaction, and upload it to the JetStream object store "
        "[replication] bucket as checkpoint-SEQUENCE, keeping the newest two. A node that "
        "starts with an empty store, or finds the stream no longer holds the entries after its "
        "sequence, restores the latest checkpoint and replays the stream from there. Nodes "
        "also take one every [replication] checkpoint_every seconds. Nothing is uploaded when "
        "the bucket already holds a checkpoint at or past the store's sequence, unless --force.",
    )
    checkpoint.add_argument("--config", type=Path, help="TOML configuration ([replication])")
    checkpoint.add_argument("--store", help="store directory (default: [server] store)")
    checkpoint.add_argument(
        "--force", action="store_true", help="upload even if the bucket holds a newer one"
    )


def _add_replay_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    replay = commands.add_parser(
        "replay",
        help="replay captured traffic against a store, or a live server, and report",
        description="Replay capture files ([enrich.capture]) against a store: the hashed ids "
        "the store knows become real again, every request is answered by the endpoint the "
        "configuration builds, in process, and the report gives the match rate per key type, "
        "segments per answer, suppressions by reason, held-out users and latency. With --url "
        "the requests also go to a live server, open loop at --rate, and its answers and "
        "latencies are reported.",
    )
    replay.add_argument("captures", nargs="+", type=Path, metavar="CAPTURE",
                        help="capture files, or directories of them")  # fmt: skip
    replay.add_argument("--store", type=Path, required=True, help="store directory")
    replay.add_argument("--url", help="a live endpoint, e.g. http://127.0.0.1:8080/enrich")
    replay.add_argument("--rate", type=float, default=DEFAULT_RATE,
                        help=f"requests per second to --url ({DEFAULT_RATE:g})")  # fmt: skip
    replay.add_argument("--limit", type=int, help="replay at most this many requests")
    replay.add_argument(
        "--config", type=Path,
        help="TOML configuration: the endpoint's settings and [enrich.capture] key",
    )  # fmt: skip
    replay.add_argument("--key", help="the capture key (default: [enrich.capture] key)")
    replay.add_argument(
        "--header", action="append", default=[], metavar="'NAME: VALUE'",
        help="extra header sent to --url",
    )  # fmt: skip
    replay.add_argument("--json", action="store_true", help="machine-readable output")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "load":
            return _load(args)
        if args.command == "lookup":
            return _lookup(args)
        if args.command == "check":
            return _check(args)
        if args.command == "export":
            return _export(args)
        if args.command == "digest":
            return _digest(args)
        if args.command == "checkpoint":
            return _checkpoint(args)
        if args.command == "compact":
            return _compact(args)
        if args.command == "consent":
            return _consent(args)
        if args.command == "explain":
            return _explain(args)
        if args.command == "segments":
            return _segments(args)
        if args.command == "ingest":
            return _ingest(args)
        if args.command == "replay":
            return _replay(args)
        return _stats(args)
    except ConfigError as exc:
        print(f"enrich-server: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SnapshotError as exc:
        print(f"enrich-server: load failed, nothing was applied:\n{exc}", file=sys.stderr)
        return EXIT_FAILED
    except EnrichError as exc:
        print(f"enrich-server: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


def _serve(args: argparse.Namespace) -> int:
    config = load_config(
        args.config,
        os.environ,
        {
            "server.store": args.store,
            "server.host": args.host,
            "server.port": args.port,
            "server.workers": args.workers,
            "server.log_level": args.log_level,
        },
    )
    setup_logging(config.server.log_level)
    if config.replicated:
        _create_if_missing(Path(config.server.store))
    SegmentStore(Path(config.server.store)).close()  # fail here, clearly, not in each worker
    _remove_leftovers(Path(config.server.store))
    log.info(
        "starting",
        extra={"version": __version__, "config": redacted(dataclasses.asdict(config))},
    )
    os.environ[CONFIG_HANDOFF_VARIABLE] = to_json(config).decode()
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again with the handler
    # it found installed: with the default one the process would die right there, before
    # the clean-up below (the ingestion process, the temporary directories).
    signal.signal(signal.SIGTERM, _terminated)
    try:
        with contextlib.ExitStack() as resources:
            if config.server.workers > 1:
                resources.enter_context(_multiprocess_metrics_dir())
            socket_path = resources.enter_context(_ingestion_process(config))
            if socket_path is not None:
                os.environ[INGEST_SOCKET_VARIABLE] = socket_path
            _run_uvicorn(config)
    except _TerminatedError:
        # Cleaned up: now end as the signal says (systemd counts that as a clean stop).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)
    return 0


def _create_if_missing(store: Path) -> None:
    """A replicated node may start with no store (an empty volume): it serves an empty one
    until its applier has restored the latest checkpoint or replayed the stream."""
    if (store_dir(store) / DATA_FILE).is_file():
        return
    with StoreWriter(store):
        pass
    log.info(
        "no store yet: serving an empty one until the replication log is applied",
        extra={"store": str(store)},
    )


def _remove_leftovers(store: Path) -> None:
    """Remove what a killed ``serve`` or ``load`` left: temporary directories, dead builds."""
    removed = [str(path) for path in remove_abandoned()] + remove_dead_builds(store)
    if removed:
        log.info("removed what a killed process left", extra={"removed": removed})


class _TerminatedError(Exception):
    """SIGTERM arrived after uvicorn's graceful shut-down."""


def _terminated(_signum: int, _frame: object) -> None:
    raise _TerminatedError


@contextlib.contextmanager
def _ingestion_process(config: Config) -> Iterator[str | None]:
    """Run the ingestion process (``ingestd``, supervised) while the block runs, when
    platforms are configured, or the node is replicated (its applier runs there); yields its
    socket path. Fails clearly when it cannot start."""
    if not config.platforms and not config.replicated:
        yield None
        return
    with owned_tempdir(INGEST_PREFIX) as folder:
        supervisor = Supervisor(config, str(folder / "ingest.sock"))
        try:
            supervisor.start()
            yield supervisor.socket_path
        finally:
            supervisor.stop()


def _run_uvicorn(config: Config) -> None:
    uvicorn.run(
        "enrich_server.app:create_app_from_handoff",
        factory=True,
        host=config.server.host,
        port=config.server.port,
        workers=config.server.workers,
        loop="uvloop",
        http=EnrichHttpProtocol,
        timeout_keep_alive=config.server.keepalive_timeout,
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        proxy_headers=False,
    )


@contextlib.contextmanager
def _multiprocess_metrics_dir() -> Iterator[None]:
    """Give the workers an empty directory for their metrics files while the block runs
    (spawned workers import prometheus_client after this, so they all write there): one made
    here and removed after, or the operator's own (then only emptied)."""
    chosen = os.environ.get(MULTIPROC_ENV)
    if chosen:
        for stale in Path(chosen).glob("*.db"):
            stale.unlink()
        yield
        return
    with owned_tempdir(METRICS_PREFIX) as made:
        os.environ[MULTIPROC_ENV] = str(made)
        yield


def _load(args: argparse.Namespace) -> int:
    setup_logging("info")
    _remove_leftovers(Path(args.store))
    config = load_config(args.config, os.environ) if args.config else None
    if config is not None and config.replicated:
        return _load_replicated(args, config)
    started = time.monotonic()
    report = load_snapshots(
        args.snapshots, args.store, replace=args.replace, progress=not args.quiet
    )
    elapsed = time.monotonic() - started
    log.info(
        "snapshot loaded",
        extra={
            "store": str(args.store),
            "files": [str(p) for p in args.snapshots],
            "replace": args.replace,
            "lines": report.lines,
            "identities": report.identities_added,
            "removed": report.memberships_removed,
            "seconds": round(elapsed, 3),
        },
    )
    print(
        f"loaded {report.lines:,} lines into {args.store} in {elapsed:.1f}s: "
        f"{report.identities_added:,} identities added or updated, "
        f"{report.memberships_removed:,} memberships removed"
    )
    return 0


#: How long ``load --replace`` on a node waits to see the node swap its snapshot in.
_SWAP_WAIT_SECONDS = 60.0


def _load_replicated(args: argparse.Namespace, config: Config) -> int:
    if not args.replace:
        raise ConfigError(
            "on a replicated node a load must be --replace (published to every node); "
            "deltas go through the DMP API, or a drop file, so that every node gets them"
        )
    started = time.monotonic()
    published = replicated_snapshots.publish_snapshot(
        config, args.snapshots, Path(args.store), progress=not args.quiet
    )
    report = published.report
    print(
        f"built {report.lines:,} lines ({report.identities_added:,} identities) in "
        f"{time.monotonic() - started:.1f}s; published {published.object} "
        f"({published.size:,} bytes) as log entry {published.sequence}"
    )
    if Path(config.server.store).resolve() != Path(args.store).resolve():
        return 0  # not this node's own store: nothing here to watch
    deadline = time.monotonic() + _SWAP_WAIT_SECONDS
    while time.monotonic() < deadline:
        store = SegmentStore(Path(args.store))
        try:
            applied, snapshot = store.applied_sequence(), store.snapshot()
        finally:
            store.close()
        if applied >= published.sequence:
            if snapshot == published.object:
                print(f"this node serves it (every node swaps it in at entry {applied})")
                return 0
            print(
                "enrich-server: every node refused the snapshot (a segment id it gives was "
                "taken by a DMP meanwhile: see the node's log); load again",
                file=sys.stderr,
            )
            return EXIT_FAILED
        time.sleep(0.2)
    print(
        f"enrich-server: this node has not applied entry {published.sequence} within "
        f"{_SWAP_WAIT_SECONDS:g} s (it is published: every node swaps it in when it gets there)",
        file=sys.stderr,
    )
    return EXIT_FAILED


def _lookup(args: argparse.Namespace) -> int:
    try:
        keys = [parse_key(text) for text in args.keys]
    except ValueError as exc:
        print(f"enrich-server: {exc}", file=sys.stderr)
        return EXIT_USAGE
    store = SegmentStore(args.store)
    now = int(time.time())
    try:
        for key in keys:
            found = store.memberships(key)
            segments = {
                name: {"expires": exp or None, "expired": bool(exp and exp <= now)}
                for name, exp in (found or {}).items()
            }
            line: dict[str, object] = {
                "key": key.decode(),
                "found": found is not None,
                "segments": segments,
            }
            synced = store.alias_of(key)
            if synced is not None:  # served with the segments of our user it was synced to
                line["synced_to"] = synced.decode()
            print(msgspec.json.encode(line).decode())
    finally:
        store.close()
    return 0


def _stats(args: argparse.Namespace) -> int:
    store = SegmentStore(args.store)
    try:
        stats = store.stats()
    finally:
        store.close()
    top = dict(list(stats.segment_members.items())[: args.top])
    if args.json:
        data = dataclasses.asdict(stats)
        data["segment_members"] = top
        print(msgspec.json.encode(data).decode())
        return 0
    age = int(time.time()) - stats.built_at if stats.built_at else None
    print(f"store        {stats.path}")
    print(f"identities   {stats.identities:,}")
    for namespace, count in stats.by_namespace.items():
        print(f"  {namespace + ':':<10} {count:,}")
    print(f"memberships  {stats.memberships:,}")
    print(f"generation   {stats.generation:,} (writes committed)")
    print(f"segments     {stats.segments:,}")
    print(f"file size    {stats.file_bytes:,} bytes ({stats.data_bytes:,} in use)")
    if stats.built_at:
        built = datetime.datetime.fromtimestamp(stats.built_at, datetime.UTC)
        print(f"built        {built:%Y-%m-%d %H:%M:%S} UTC ({_age(age or 0)} ago)")
    print(f"top segments by members (of {stats.segments}):")
    for name, count in top.items():
        print(f"  {count:>12,}  {name}")
    return 0


def _digest(args: argparse.Namespace) -> int:
    store = SegmentStore(args.store)
    try:
        found = store_digest(store)
    finally:
        store.close()
    line: dict[str, object] = {"sequence": found.sequence, "digest": found.digest}
    if args.parts:
        line["parts"] = {name: dataclasses.asdict(part) for name, part in found.parts.items()}
    print(msgspec.json.encode(line).decode())
    return 0


def _checkpoint(args: argparse.Namespace) -> int:
    config = load_config(args.config, os.environ, {"server.store": args.store})
    if not config.replicated:
        raise ConfigError("checkpoint needs a replicated configuration ([replication] nats)")
    setup_logging("warning")
    SegmentStore(Path(config.server.store)).close()  # a missing store: a clear error, first
    taken = asyncio.run(checkpoints.take(config, only_if_newer=not args.force))
    bucket = config.replication.bucket
    if taken is None:
        print(f"bucket {bucket} already holds a checkpoint at or past this store's sequence")
    else:
        print(
            f"uploaded {taken.name} ({taken.size:,} bytes, sequence {taken.sequence}) "
            f"to bucket {bucket}"
        )
    return 0


def _export(args: argparse.Namespace) -> int:
    store = SegmentStore(args.store)
    try:
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(args.out.open("w")) if args.out else sys.stdout
            count = 0
            for line in export_lines(store.items()):
                out.write(line)
                count += 1
    finally:
        store.close()
    if args.out:
        print(f"exported {count:,} lines to {args.out}", file=sys.stderr)
    return 0


def _compact(args: argparse.Namespace) -> int:
    setup_logging("info")
    if not (store_dir(args.store) / DATA_FILE).is_file():
        SegmentStore(args.store)  # raises the usual "no segment store at ..." error
    config = load_config(args.config, os.environ) if args.config else None
    if config is not None and config.replicated:
        done = replicated_compaction.compact_published(config.replication, args.store)
        print(
            f"published the compaction as of {done.at} in {done.slices:,} slice(s) (log entries"
            f" {done.first}-{done.last}); this node applied them, every node applies them"
        )
        return 0
    # Dropping expired memberships on one node, at its own clock, would make its digest
    # differ from the other nodes' (they serve the same either way: expired is nothing).
    _refuse_replicated(args.store, "pass the node's --config, so that every node compacts alike")
    with StoreWriter(args.store) as writer:
        removed, deleted = writer.drop_expired(int(time.time()))
    log.info("store compacted", extra={"store": str(args.store), "removed": removed,
                                       "deleted_keys": deleted})  # fmt: skip
    print(f"removed {removed:,} expired memberships; {deleted:,} identities left with none")
    return 0


def _refuse_replicated(store: Path, why: str) -> None:
    """``ConfigError`` when ``store`` follows a replication log: a change made to it alone
    would reach no other node."""
    opened = SegmentStore(store)
    try:
        sequence = opened.applied_sequence()
    finally:
        opened.close()
    if sequence:
        raise ConfigError(
            f"{store} is a replicated node's store (it applied log entries up to {sequence}): {why}"
        )


def _section_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ids: {text!r}") from None


def _consent(args: argparse.Namespace) -> int:
    config = load_config(args.config, os.environ)
    lines, reason = explain_consent(args.string, privacy_policy(config), args.gpp_sid)
    print("\n".join(lines))
    return 0 if reason is None else EXIT_FAILED


def _explain(args: argparse.Namespace) -> int:
    config = load_config(args.config, os.environ, {"enrich.guard_lag_ms": 0.0})
    try:
        body = sys.stdin.buffer.read() if args.body == "-" else Path(args.body).read_bytes()
    except OSError as exc:
        print(f"enrich-server: cannot read {args.body}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    endpoint = enrich_endpoint(config)
    endpoint.store = SegmentStore(args.store)
    try:
        _, answer = explain_call(endpoint, body, clock())  # the guard is off here
    except msgspec.DecodeError as exc:
        print(f"enrich-server: {args.body}: not JSON: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        endpoint.store.close()
    print(msgspec.json.format(msgspec.json.encode(answer), indent=2).decode())
    return 0


def _segments(args: argparse.Namespace) -> int:
    store = SegmentStore(args.store)
    try:
        stats = store.stats()
    finally:
        store.close()
    for name, members in stats.segment_members.items():
        print(f"{name}\t{members}")
    return 0


def _add_ingest_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ingest = commands.add_parser(
        "ingest",
        help="apply DMP drop files (Mapp_dmp_<segment>_<y>_<m>_<d>_<h>_<min>.tsv.gz)",
        description="Apply DMP drop files: gzip TSV, one user id (our uid) a line, optionally "
        "a tab and add or remove. The segment id in the name must be a segment a DMP created "
        "through POST /v1/segment; added users get its platform's ttl (from --config). Each "
        "file is applied whole in one transaction, exactly once (the store records applied "
        "names; a re-run skips them); a bad file is refused with its bad line numbers. With "
        "--watch, files dropped in DIR are applied as they settle, then moved to DIR/applied "
        "or, refused, to DIR/rejected with a .why file. With a replicated --config, --store is "
        "the node's own store: a file is validated against it, published to the replication "
        "log as one entry and applied by every node; the command returns once this node "
        "applied it.",
    )
    ingest.add_argument("files", nargs="*", type=Path, metavar="FILE")
    ingest.add_argument("--store", type=Path, required=True, help="store directory")
    ingest.add_argument(
        "--config", type=Path, help="TOML configuration ([[platform]] ttl, [replication])"
    )
    ingest.add_argument("--watch", type=Path, metavar="DIR", help="drop directory to watch")
    ingest.add_argument(
        "--interval", type=float, default=5.0, help="seconds between scans of DIR (5)"
    )
    ingest.add_argument(
        "--settle",
        type=float,
        default=DEFAULT_SETTLE_SECONDS,
        help=f"skip files modified less than this many seconds ago ({DEFAULT_SETTLE_SECONDS:g})",
    )
    ingest.add_argument("--once", action="store_true", help="scan DIR once, then exit")


def _ingest(args: argparse.Namespace) -> int:
    if not args.files and args.watch is None:
        print("enrich-server: ingest needs FILE arguments or --watch DIR", file=sys.stderr)
        return EXIT_USAGE
    config = load_config(args.config, os.environ)
    setup_logging(config.server.log_level)
    platforms = {p.id: p for p in config.platforms}
    if not (store_dir(args.store) / DATA_FILE).is_file():
        SegmentStore(args.store)  # raises the usual "no segment store" error
    apply = _drop_file_applier(config, args.store, platforms)

    failed = 0
    for path in args.files:
        try:
            result = apply(path)
        except EnrichError as exc:  # refused, or (replicated) not applied here yet
            print(f"enrich-server: {exc}", file=sys.stderr)
            failed += 1
            continue
        except OSError as exc:
            print(f"enrich-server: {path}: {exc.strerror}", file=sys.stderr)
            failed += 1
            continue
        if result.skipped:
            print(f"{path}: already applied, skipped")
        elif result.sequence:
            print(
                f"{path}: segment {result.segment}: {result.added:,} add and "
                f"{result.removed:,} remove lines applied as log entry {result.sequence}"
            )
        else:
            print(
                f"{path}: segment {result.segment}: {result.added:,} added, "
                f"{result.removed:,} removed"
            )
    if args.watch is not None:
        if not args.watch.is_dir():
            print(f"enrich-server: {args.watch} is not a directory", file=sys.stderr)
            return EXIT_USAGE
        log.info("watching drop directory", extra={"dir": str(args.watch)})
        while True:
            outcomes = process_ready(args.watch, apply, args.settle)
            failed += sum(isinstance(o, EnrichError) for o in outcomes)
            if args.once:
                break
            time.sleep(args.interval)
    return EXIT_FAILED if failed else 0


def _drop_file_applier(
    config: Config, store: Path, platforms: dict[int, PlatformConfig]
) -> Callable[[Path], FileResult]:
    """How ``ingest`` applies one file: in a transaction of its own on a single node; on a
    replicated node, published to the log and applied by every node. A store that follows a
    log is never written directly: the other nodes would not get the file."""
    if config.replicated:
        return functools.partial(
            replicated_dropfiles.apply_published, config.replication, store, platforms=platforms
        )
    _refuse_replicated(store, "pass the node's --config, so that every node gets the file")

    def apply(path: Path) -> FileResult:
        with StoreWriter(store) as writer:
            return apply_file(path, writer, platforms)

    return apply


def _check(args: argparse.Namespace) -> int:
    try:
        target = parse_target(args.url, args.header)
        bodies = read_bodies(args.bodies)
        if args.rate <= 0 or args.duration <= 0 or args.connections < 1:
            raise ValueError("--rate, --duration and --connections must be positive")
        result = uvloop.run(
            run_check(
                target,
                bodies,
                rate=args.rate,
                duration=args.duration,
                connections=args.connections,
                timeout=args.timeout,
                count_shed=True,
            )
        )
    except (ValueError, OSError) as exc:
        print(f"enrich-server: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(msgspec.json.encode(result.to_dict()).decode())
    else:
        print(format_report(result, args.url))
    return EXIT_FAILED if result.trips_breaker() else 0


def _replay(args: argparse.Namespace) -> int:
    config = load_config(args.config, os.environ)
    key = args.key if args.key is not None else config.capture.key
    if not key:
        print(
            "enrich-server: replay needs the capture key: --key, or [enrich.capture] key in"
            " --config (or ENRICH_ENRICH_CAPTURE_KEY)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.rate <= 0 or (args.limit is not None and args.limit < 1):
        print("enrich-server: --rate and --limit must be positive", file=sys.stderr)
        return EXIT_USAGE
    try:
        requests = list(itertools.islice(read_capture(args.captures), args.limit))
        report = replay(
            config,
            requests,
            args.store,
            key.encode(),
            url=args.url,
            rate=args.rate,
            headers=args.header,
        )
    except (ValueError, OSError) as exc:
        print(f"enrich-server: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(msgspec.json.encode(report.to_dict()).decode())
    else:
        print(format_replay(report, args.store))
    return 0


def _age(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"
