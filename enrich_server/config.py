"""Configuration: one frozen, typed object built at start-up.

Precedence: built-in defaults < TOML file (``--config``) < ``ENRICH_<SECTION>_<KEY>``
environment variables < command-line flags. Unknown keys (in the file or as ``ENRICH_*``
variables) are an error naming the key. The environment is read here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec

from enrich_server.errors import ConfigError
from enrich_server.privacy import US_RULE_SETS

#: The demo store bundled at the repository root (``make run`` serves it).
EXAMPLE_STORE: Final = Path(__file__).resolve().parent.parent / "segments.lmdb.example"
#: The seed's sample requests, shipped with the package (``check`` sends them by default).
SAMPLES_DIR: Final = Path(__file__).resolve().parent / "samples"
ENV_PREFIX: Final = "ENRICH_"
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


def _opt(
    default: Any,
    doc: str,
    check: Callable[[Any], str | None] | None = None,
    item: type[Any] = str,
) -> Any:
    """A configuration option: default, doc line, validity check, and for lists the item type."""
    meta = {"doc": doc, "check": check, "kind": type(default), "item": item}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def _purposes(value: tuple[int, ...]) -> str | None:
    return None if all(1 <= p <= 24 for p in value) else "has a purpose outside 1-24"


def _header_name(value: str) -> str | None:
    ok = all(c.isalnum() or c in "-_" for c in value)
    return None if ok else "is not an HTTP header name"


def _cidrs(value: tuple[str, ...]) -> str | None:
    for cidr in value:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            return f"has {cidr!r}, which is not an IPv4 or IPv6 address or CIDR"
    return None


def _nonempty_items(value: tuple[str, ...] | dict[str, str]) -> str | None:
    items = list(value.items()) if isinstance(value, dict) else [("", v) for v in value]
    return None if all(k is not None and v for k, v in items) else "has an empty entry"


def _share(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must be between 0 and 1"


def _segtax(value: dict[str, int]) -> str | None:
    ok = all(0 < v < 2**31 for v in value.values())
    return None if ok else "has a segtax that is not a positive integer"


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be between 0 and 65535"


def _positive(value: int) -> str | None:
    return None if value >= 1 else "must be at least 1"


def _not_negative(value: int) -> str | None:
    return None if value >= 0 else "must not be negative"


#: The longest any timeout may be set to: an hour.
MAX_TIMEOUT_SECONDS: Final = 3600.0


def _seconds(value: float) -> str | None:
    ok = 0 < value <= MAX_TIMEOUT_SECONDS  # also refuses nan
    return None if ok else f"must be more than 0 and at most {MAX_TIMEOUT_SECONDS:g} seconds"


def _http_path(value: str) -> str | None:
    return None if value.startswith("/") and " " not in value else "must be a path starting with /"


def _log_level(value: str) -> str | None:
    return None if value in LOG_LEVELS else f"must be one of {', '.join(LOG_LEVELS)}"


def _us_rules(value: str) -> str | None:
    return None if value in US_RULE_SETS else f"must be one of {', '.join(US_RULE_SETS)}"


DURABILITY: Final = ("fsync", "os")


def _durability(value: str) -> str | None:
    return None if value in DURABILITY else f"must be one of {', '.join(DURABILITY)}"


def _nats_urls(value: tuple[str, ...]) -> str | None:
    if any(not url.startswith(("nats://", "tls://")) or len(url) <= 7 for url in value):
        return "must be nats:// or tls:// URLs"
    return None


def _stream_name(value: str) -> str | None:
    # JetStream names: no whitespace, no subject tokens (. * >), no path separators.
    if not value or any(c in value for c in " \t.*>/\\") or len(value) > 32:
        return "must be 1-32 characters without spaces, '.', '*', '>' or slashes"
    return None


def _bucket_name(value: str) -> str | None:
    # JetStream object store names: letters, digits, '-' and '_' only.
    ok = 0 < len(value) <= 32 and all(c.isascii() and (c.isalnum() or c in "-_") for c in value)
    return None if ok else "must be 1-32 letters, digits, '-' or '_'"


def _checkpoint_interval(value: float) -> str | None:
    ok = value == 0 or 60 <= value <= 7 * 86400  # also refuses nan
    return None if ok else "must be 0 (off) or 60 to 604800 seconds"


def _stream_replicas(value: int) -> str | None:
    return None if 1 <= value <= 5 else "must be 1-5 (JetStream's limit)"


def _nice(value: int) -> str | None:
    return None if 0 <= value <= 19 else "must be between 0 and 19"


#: Platform ids travel as ``pl`` query parameters and are stored in 4 bytes.
MAX_PLATFORM_ID: Final = 999_999_999


def _platform_id(value: int) -> str | None:
    return None if 0 < value <= MAX_PLATFORM_ID else f"must be between 1 and {MAX_PLATFORM_ID}"


def _platform_name(value: str) -> str | None:
    ok = value and value.isascii() and all(c.isalnum() or c == "_" for c in value)
    return None if ok else "must be letters, digits or _ (it names metrics and variables)"


def _basic(value: str) -> str | None:
    return None if not value or ":" in value[1:] else "must be user:password"


def _hosts(value: tuple[str, ...]) -> str | None:
    for host in value:
        if not host or host != host.lower() or not all(c.isalnum() or c in ".-" for c in host):
            return f"has {host!r}, which is not a lower-case host name"
    return None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """``[server]``: where and how the process serves."""

    host: str = _opt("127.0.0.1", "address to bind (use 0.0.0.0 or :: to serve beyond loopback)")
    port: int = _opt(8080, "TCP port to bind", _port)
    workers: int = _opt(1, "worker processes sharing the port and the store", _positive)
    store: str = _opt(str(EXAMPLE_STORE), "segment store directory (LMDB)")
    log_level: str = _opt("info", "lowest level logged: debug, info, warning, error", _log_level)
    keepalive_timeout: int = _opt(
        5, "seconds a connection may wait for its next request (or its first)", _positive
    )
    header_timeout: float = _opt(
        5.0, "seconds from a request's first byte to the end of its headers", _seconds
    )
    body_timeout: float = _opt(
        10.0, "seconds from the end of a request's headers to the end of its body", _seconds
    )
    max_idle_connections: int = _opt(
        4096,
        "idle keep-alive connections a worker keeps; one more closes the longest idle",
        _positive,
    )


@dataclass(frozen=True, slots=True)
class EnrichConfig:
    """``[enrich]``: the Index-facing endpoint."""

    path: str = _opt("/enrich", "path of the enrichment endpoint", _http_path)
    max_age: int = _opt(
        86400, "Cache-Control max-age (seconds) when segments are known", _not_negative
    )
    max_body: int = _opt(
        65536,
        "largest request body accepted (bytes); larger gets 413. Index's fragments are a few"
        " KB; the bound keeps the cost of any one request under the hot path's budget",
        _positive,
    )
    guard_lag_ms: float = _opt(
        2.0,
        "answer empty at once a request that has waited longer than this (ms) when its work"
        " would start: since its first bytes arrived, plus the event loop's lag; 0 = never",
        _not_negative,
    )
    holdout: float = _opt(
        0.0,
        "share of users (a stable hash of their first user-level key) answered empty, to"
        " measure what the segments add; 0 = off",
        _share,
    )


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """``[enrich.auth]``: who may call the enrichment endpoint; nothing set = open.

    Tokens (header, query or OAuth bearer) are alternatives: any one valid credential is
    enough. The IP allow-list applies on top of them.
    """

    header: str = _opt("", "request header carrying a token (e.g. X-Api-Key); empty = off",
                       _header_name)  # fmt: skip
    query: str = _opt("", "query parameter carrying a token (e.g. token); empty = off")
    tokens: tuple[str, ...] = _opt(
        (), "tokens accepted in the header or query parameter", _nonempty_items
    )
    oauth_clients: dict[str, str] = _opt(  # noqa: RUF009 - _opt returns a dataclasses.field
        {}, "OAuth2 client id -> secret for POST /oauth/token (client_credentials)",
        _nonempty_items,
    )  # fmt: skip
    oauth_keys: tuple[str, ...] = _opt(
        (), "keys signing OAuth access tokens: the first signs, all verify (rotation)",
        _nonempty_items,
    )  # fmt: skip
    oauth_ttl: int = _opt(3600, "lifetime of an issued access token, seconds", _positive)
    allow_cidrs: tuple[str, ...] = _opt(
        (), "client networks allowed (IPv4/IPv6 CIDRs); empty = any", _cidrs
    )
    trusted_proxies: tuple[str, ...] = _opt(
        (), "proxies whose X-Forwarded-For is believed (CIDRs); empty = never read it", _cidrs
    )
    explain_tokens: tuple[str, ...] = _opt(
        (), "operator tokens for POST <path>?explain=1 (Authorization: Bearer); empty = off",
        _nonempty_items,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class OrtbConfig:
    """``[ortb]``: the OpenRTB-native answer (``user.data``) for Prebid Server modules."""

    path: str = _opt("/ortb", "path of the OpenRTB endpoint", _http_path)
    data_name: str = _opt("enrich-server", "user.data[].name: who provides the segments")
    segtax: dict[str, int] = _opt(  # noqa: RUF009 - _opt returns a dataclasses.field
        {}, "segment-name prefix -> segtax (IAB taxonomy id) of its user.data entry; the"
        " longest matching prefix wins, a segment matching none goes in an entry without",
        _segtax, item=int,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class RtcConfig:
    """``[rtc]``: AMP Real-Time Config (``GET``, macros in the query string)."""

    path: str = _opt("/rtc", "path of the AMP RTC endpoint", _http_path)
    targeting_key: str = _opt(
        "enrich_segments", "key of the segment list in the answer's targeting object",
        _header_name,
    )  # fmt: skip


#: The shortest ``[enrich.capture] key``: a short key could be found by trying keys on the
#: hashed ids of a capture file.
MIN_CAPTURE_KEY_CHARS: Final = 16


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    """``[enrich.capture]``: a sample of requests, ids hashed, written for ``replay``."""

    path: str = _opt("", "directory of the capture files (capture-<pid>-<n>.jsonl); empty = off")
    sample: float = _opt(0.001, "share of requests captured (0-1)", _share)
    key: str = _opt(
        "", f"HMAC key of the hashed ids (at least {MIN_CAPTURE_KEY_CHARS} characters);"
        " required with path, and by replay",
    )  # fmt: skip
    max_bytes: int = _opt(67108864, "size at which a capture file is closed for the next",
                          _positive)  # fmt: skip
    keep: int = _opt(8, "capture files kept per worker; older ones are removed", _positive)


@dataclass(frozen=True, slots=True)
class PrivacyConfig:
    """``[privacy]``: which signals withhold user-level segments (contextual ones stay)."""

    coppa: bool = _opt(True, "honour regs.coppa == 1")
    us_privacy: bool = _opt(True, "honour a US Privacy opt-out of sale (1YYN)")
    gdpr: bool = _opt(True, "under gdpr == 1, require a TCF v2 string allowing the purposes")
    gpp: bool = _opt(True, "honour the US opt-outs (and TCF/USP sections) of regs.gpp")
    gdpr_vendor_id: int = _opt(0, "our TCF vendor id; 0 = check purposes only", _not_negative)
    gdpr_purposes: tuple[int, ...] = _opt(
        (1, 3, 4), "TCF purposes that must be allowed (consent, or LI where TCF permits)",
        _purposes, item=int,
    )  # fmt: skip
    us_rules: str = _opt(
        "strict", "GPP US sections: strict (Prebid Server's national rules) or opt_outs",
        _us_rules,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class DmpConfig:
    """``[dmp]``: the user-sync and audience-ingestion API shared by every platform."""

    cookie: str = _opt("enrich_uid", "cookie holding our user id (set by /sync and /uid)",
                       _header_name)  # fmt: skip
    cookie_max_age: int = _opt(31536000, "lifetime of that cookie, seconds", _positive)
    signature_window: int = _opt(
        300, "signed /sync and /uid: accepted clock skew of ts, seconds", _positive
    )
    max_batch: int = _opt(10000, "most items in one micro-batch", _positive)
    max_body: int = _opt(4194304, "largest ingestion request body (bytes)", _positive)
    durability: str = _opt(
        "fsync",
        "fsync: every commit on disk before its 2xx (survives power loss); os: handed to the "
        "OS before the 2xx (survives any crash of enrich-server), flushed every second",
        _durability,
    )
    writer_idle: bool = _opt(
        True, "run the ingestion process as SCHED_IDLE: only on CPU time the workers leave"
    )
    writer_nice: int = _opt(
        10, "niceness of the ingestion process when writer_idle is off (0-19)", _nice
    )


@dataclass(frozen=True, slots=True)
class ReplicationConfig:
    """``[replication]``: several equal nodes fed by one NATS JetStream log (DESIGN §8).

    Without ``nats`` the node is a single node: its log is the local ingestion process.
    """

    nats: tuple[str, ...] = _opt(
        (), "NATS server URLs (nats://host:port); empty = single node", _nats_urls
    )
    stream: str = _opt("ENRICH", "JetStream stream holding the log of DMP entries", _stream_name)
    replicas: int = _opt(
        1, "copies of the stream JetStream keeps (created with it): 3 on a 3-node cluster",
        _stream_replicas,
    )  # fmt: skip
    bucket: str = _opt(
        "enrich-snapshots", "JetStream object store of checkpoints, snapshots, large drop files",
        _bucket_name,
    )  # fmt: skip
    max_lag: float = _opt(5.0, "seconds behind the stream before /readyz answers 503", _seconds)
    checkpoint_every: float = _opt(
        3600.0, "seconds between automatic checkpoints; 0 = only enrich-server checkpoint",
        _checkpoint_interval,
    )  # fmt: skip
    publish_timeout: float = _opt(
        2.0, "how long a DMP write waits for JetStream's acknowledgement before its 503",
        _seconds,
    )  # fmt: skip

    @property
    def subject(self) -> str:
        """The subject the stream's entries are published on."""
        return self.stream + ".entries"


@dataclass(frozen=True, slots=True)
class PlatformConfig:
    """``[[platform]]``: one DMP or exchange that syncs users with us or pushes audiences.

    Its secrets can come from ``ENRICH_PLATFORM_<NAME>_<KEY>`` variables (``NAME`` upper-cased).
    """

    id: int = _opt(0, "the platform's numeric id (the seed's pl)", _platform_id)
    name: str = _opt("", "short name: metrics label, ENRICH_PLATFORM_<NAME>_* prefix",
                     _platform_name)  # fmt: skip
    basic: str = _opt("", "ingestion credentials user:password (HTTP Basic); empty = off", _basic)
    tokens: tuple[str, ...] = _opt((), "ingestion bearer tokens", _nonempty_items)
    plsec: str = _opt("", "token /uid expects in plsec; empty = plain /uid refused")
    hmac_secret: str = _opt(
        "", "secret of signed /sync and /uid (HMAC-SHA1); when set, its syncs must be signed"
    )
    sync_hosts: tuple[str, ...] = _opt((), "hosts /sync may redirect to for it", _hosts)
    ttl: int = _opt(
        2592000, "default membership TTL (seconds) of users it pushes; 0 = none", _not_negative
    )


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration; one section per TOML table, ``platforms`` per ``[[platform]]``."""

    server: ServerConfig = field(default_factory=ServerConfig)
    enrich: EnrichConfig = field(default_factory=EnrichConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    dmp: DmpConfig = field(default_factory=DmpConfig)
    ortb: OrtbConfig = field(default_factory=OrtbConfig)
    rtc: RtcConfig = field(default_factory=RtcConfig)
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    platforms: tuple[PlatformConfig, ...] = ()

    @property
    def replicated(self) -> bool:
        """Whether the node's log is a JetStream stream (``[replication] nats`` set)."""
        return bool(self.replication.nats)

    def platform(self, platform_id: int) -> PlatformConfig | None:
        """The platform with id ``platform_id``, if configured."""
        for platform in self.platforms:
            if platform.id == platform_id:
                return platform
        return None


#: TOML table -> (``Config`` field, section class).
_SECTIONS: Final[dict[str, tuple[str, type[Any]]]] = {
    "server": ("server", ServerConfig),
    "enrich": ("enrich", EnrichConfig),
    "enrich.auth": ("auth", AuthConfig),
    "enrich.capture": ("capture", CaptureConfig),
    "privacy": ("privacy", PrivacyConfig),
    "dmp": ("dmp", DmpConfig),
    "ortb": ("ortb", OrtbConfig),
    "rtc": ("rtc", RtcConfig),
    "replication": ("replication", ReplicationConfig),
}
#: The TOML array of tables holding the platforms, and the prefix of their variables.
PLATFORM_TABLE: Final = "platform"
PLATFORM_ENV_PREFIX: Final = f"{ENV_PREFIX}PLATFORM_"


def options() -> list[tuple[str, str, Any, str]]:
    """Every option as ``(section.key, ENV_NAME, default, doc)``, for ``--help`` and README."""
    out = []
    for section, (_, cls) in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            env = f"{ENV_PREFIX}{section}_{f.name}".replace(".", "_").upper()
            default = f.default if f.default is not dataclasses.MISSING else {}
            out.append((f"{section}.{f.name}", env, default, f.metadata["doc"]))
    for f in dataclasses.fields(PlatformConfig):
        env = f"{PLATFORM_ENV_PREFIX}<NAME>_{f.name.upper()}"
        out.append((f"[[{PLATFORM_TABLE}]].{f.name}", env, f.default, f.metadata["doc"]))
    return out


def _from_text(where: str, kind: type[Any], value: str, item: type[Any] = str) -> Any:
    """Parse an environment value: numbers, booleans, ``a,b`` lists, ``id=secret`` maps."""
    if kind in (int, float) or (kind is tuple and item is int):
        try:
            if kind is tuple:
                return [int(part) for part in value.split(",") if part.strip()]
            return kind(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not a number") from None
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"{where}: {value!r} is not true or false")
        return value.lower() in ("true", "1")
    if kind is tuple:
        return [part.strip() for part in value.split(",") if part.strip()]
    if kind is dict:
        pairs = [entry.partition("=") for entry in value.split(",") if entry.strip()]
        if not all(sep for _, sep, _ in pairs):
            raise ConfigError(f"{where}: expected id=value pairs separated by commas")
        try:
            return {k.strip(): item(v.strip()) for k, _, v in pairs}
        except ValueError:
            raise ConfigError(f"{where}: a value is not a number") from None
    return value


def _convert(where: str, f: dataclasses.Field[Any], value: Any, text: bool = False) -> Any:
    """Check ``value`` for field ``f``; ``text`` values (environment) are parsed first."""
    kind = f.metadata["kind"]
    item = f.metadata["item"]
    if text:
        value = _from_text(where, kind, value, item)
    if kind is float and type(value) is int:
        value = float(value)
    if kind is tuple and isinstance(value, list):
        if not all(type(entry) is item for entry in value):
            raise ConfigError(
                f"{where}: expected a list of {'integers' if item is int else 'strings'}"
            )
        value = tuple(value)
    if (
        kind is dict
        and isinstance(value, dict)
        and not all(type(v) is item for v in value.values())
    ):
        kinds = "integers" if item is int else "strings"
        raise ConfigError(f"{where}: expected a table of {kinds}")
    if type(value) is not kind:
        expected = "list" if kind is tuple else "table" if kind is dict else kind.__name__
        raise ConfigError(f"{where}: expected {expected}, got {type(value).__name__}")
    check = f.metadata["check"]
    problem = check(value) if check is not None else None
    if problem:
        raise ConfigError(f"{where}: {value!r} {problem}")
    return value


def load_config(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Build the configuration from a TOML file, ``ENRICH_*`` variables and flags.

    ``flags`` maps ``"section.key"`` to a value; ``None`` values (flags not given) are ignored.
    Raises ``ConfigError`` naming the offending key.
    """
    values: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    platform_values: list[dict[str, Any]] = []
    fields = {
        name: {f.name: f for f in dataclasses.fields(cls)} for name, (_, cls) in _SECTIONS.items()
    }
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        platform_tables = data.pop(PLATFORM_TABLE, [])
        if not isinstance(platform_tables, list):
            raise ConfigError(f"{path}: {PLATFORM_TABLE} must be an array of tables [[platform]]")
        for number, table in enumerate(platform_tables, start=1):
            platform_values.append(_platform_values(f"{path}: [[platform]] #{number}", table))
        tables = list(data.items())
        while tables:
            section, table = tables.pop(0)
            if section not in _SECTIONS:
                raise ConfigError(f"{path}: unknown section [{section}]")
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: {section} must be a table")
            for key, value in table.items():
                if f"{section}.{key}" in _SECTIONS and isinstance(value, dict):
                    tables.append((f"{section}.{key}", value))  # a sub-table: [enrich.auth]
                    continue
                if key not in fields[section]:
                    raise ConfigError(f"{path}: unknown key {key!r} in [{section}]")
                where = f"{path}: [{section}] {key}"
                values[section][key] = _convert(where, fields[section][key], value)
    by_env = {env: key for key, env, _, _ in options()}
    for name, value in (environ or {}).items():
        if name.startswith(PLATFORM_ENV_PREFIX):
            _platform_from_env(name, value, platform_values)
            continue
        if not name.startswith(ENV_PREFIX):
            continue
        if name not in by_env:
            raise ConfigError(f"unknown environment variable {name}")
        section, key = by_env[name].rsplit(".", 1)
        values[section][key] = _convert(name, fields[section][key], value, text=True)
    for dotted, value in (flags or {}).items():
        if value is None:
            continue
        section, key = dotted.rsplit(".", 1)
        flag = "--" + key.replace("_", "-")
        values[section][key] = _convert(flag, fields[section][key], value)
    platforms = tuple(PlatformConfig(**entry) for entry in platform_values)
    _check_platforms(platforms)
    config = Config(
        **{attr: cls(**values[name]) for name, (attr, cls) in _SECTIONS.items()},
        platforms=platforms,
    )
    _check_sections(config, bool(values["replication"]))
    return config


def _check_sections(config: Config, replication_given: bool) -> None:
    _check_paths(config)
    _check_capture(config.capture)
    if replication_given and not config.replicated:
        raise ConfigError("[replication] needs nats (the NATS URLs); without it, leave it out")


def _check_paths(config: Config) -> None:
    """The endpoint's callers each need their own path."""
    paths = {"enrich.path": config.enrich.path, "ortb.path": config.ortb.path,
             "rtc.path": config.rtc.path}  # fmt: skip
    for key, value in paths.items():
        same = [other for other, path in paths.items() if path == value and other != key]
        if same:
            raise ConfigError(f"{key} and {same[0]} are the same path {value!r}")


def _check_capture(capture: CaptureConfig) -> None:
    if capture.path and not capture.key:
        raise ConfigError(
            "[enrich.capture] path is set but key is not: the capture hashes user ids with it"
            " (set key, or ENRICH_ENRICH_CAPTURE_KEY)"
        )
    if capture.key and len(capture.key) < MIN_CAPTURE_KEY_CHARS:
        raise ConfigError(f"[enrich.capture] key: shorter than {MIN_CAPTURE_KEY_CHARS} characters")


def _check_platforms(platforms: tuple[PlatformConfig, ...]) -> None:
    """What no single table can tell: ids, names and credentials unique across them."""
    for attr in ("id", "name"):
        seen = [getattr(p, attr) for p in platforms]
        twice = {v for v in seen if seen.count(v) > 1}
        if twice:
            raise ConfigError(f"two [[platform]] tables have the same {attr}: {twice.pop()!r}")
    credentials = [c for p in platforms for c in ((p.basic,) if p.basic else ()) + p.tokens]
    if len(credentials) != len(set(credentials)):
        # one credential must name one platform: whose pushes would they be?
        raise ConfigError("two [[platform]] tables share an ingestion credential (basic or token)")


_PLATFORM_FIELDS: Final = {f.name: f for f in dataclasses.fields(PlatformConfig)}


def _platform_values(where: str, table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in _PLATFORM_FIELDS:
            raise ConfigError(f"{where}: unknown key {key!r}")
        values[key] = _convert(f"{where} {key}", _PLATFORM_FIELDS[key], value)
    for required in ("id", "name"):
        if required not in values:
            raise ConfigError(f"{where}: {required} is required")
    return values


def _platform_from_env(name: str, value: str, platforms: list[dict[str, Any]]) -> None:
    """Apply ``ENRICH_PLATFORM_<NAME>_<KEY>`` to the platform of that name (from the file)."""
    rest = name[len(PLATFORM_ENV_PREFIX) :]
    for entry in platforms:
        prefix = f"{entry['name'].upper()}_"
        key = rest[len(prefix) :].lower()
        if rest.startswith(prefix) and key in _PLATFORM_FIELDS and key not in ("id", "name"):
            entry[key] = _convert(name, _PLATFORM_FIELDS[key], value, text=True)
            return
    raise ConfigError(
        f"unknown environment variable {name} (no [[platform]] of that name has that key)"
    )


def to_json(config: Config) -> bytes:
    """Serialise a resolved configuration (handed to worker processes)."""
    return msgspec.json.encode(config)


def from_json(data: bytes | str) -> Config:
    """Inverse of ``to_json``."""
    return msgspec.json.decode(data, type=Config)
