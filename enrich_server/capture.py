"""Capture: a sample of real ``/enrich`` requests, without who they were about.

``[enrich.capture]`` writes one JSON line per sampled request to rotating files in ``path``
(``capture-<pid>-<n>.jsonl``, one writer per worker process)::

    {"v": 1, "ts": 1764872000.123, "key_id": "3f9a0c1e", "status": 200, "segments": 3,
     "suppressed": null, "holdout": false, "body": {...the request, sanitised...}}

Sanitised: every user-level id (``user.id``, ``user.buyeruid``, each ``uids[].id`` of
``user.eids`` and ``user.ext.eids``, ``device.ifa`` and the hashed device ids) is replaced by
a keyed hash, ``~h:`` + 32 hex digits of HMAC-SHA256 under ``[enrich.capture] key``; IP
addresses and precise geolocation are dropped; an id that is not a string is dropped. Without
the key nobody can tell which user a line is about, nor test a guessed id. ``replay`` holds the
key and a store: it turns back into real ids exactly the hashes of ids the store knows, so a
captured user the store does not know stays a miss, as it was.

The hot path pays one ``is None`` when capture is off and one ``random()`` comparison for a
request sampled out; only a sampled request is decoded again and written (one ``write``
call, so a line is complete). A write error is logged once and turns capture off: requests
never fail for it.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Final

import msgspec

from enrich_server.config import CaptureConfig
from enrich_server.keys import is_zero_ifa, request_keys
from enrich_server.openrtb import decode
from enrich_server.privacy import Privacy

FORMAT_VERSION: Final = 1
#: What a hashed id starts with; the rest is ``HASH_HEX`` hex digits.
HASH_PREFIX: Final = "~h:"
HASH_HEX: Final = 32
FILE_PATTERN: Final = "capture-*.jsonl"
_FILE_NAME: Final = re.compile(r"capture-(\d+)-(\d+)\.jsonl")
#: The device fields holding an identifier besides ``ifa`` (OpenRTB 2.x, hashed by the
#: exchange, but still one per device).
_DEVICE_IDS: Final = ("dpidsha1", "dpidmd5", "didsha1", "didmd5", "macsha1", "macmd5")
_DEVICE_DROPPED: Final = ("ip", "ipv6")
_GEO_DROPPED: Final = ("lat", "lon")
_KEY_ID_MESSAGE: Final = b"enrich-server capture key id"

_ENCODER: Final = msgspec.json.Encoder()
_ANSWER: Final = msgspec.json.Decoder(dict[str, list[str]])

log = logging.getLogger(__name__)

#: Maps an id to what replaces it; ``None`` drops the field.
IdTransform = Callable[[str], str | None]


def hash_id(key: bytes, ident: bytes) -> str:
    """The keyed hash that stands for the id ``ident`` (UTF-8) in a capture file."""
    digest = hmac.digest(key, ident, "sha256")
    return HASH_PREFIX + digest.hex()[:HASH_HEX]


def key_id(key: bytes) -> str:
    """A short fingerprint of a capture key, written in each line: replay tells a wrong key
    from traffic the store does not know. It reveals nothing of the key."""
    return hmac.digest(key, _KEY_ID_MESSAGE, "sha256").hex()[:8]


def map_ids(body: dict[str, Any], transform: IdTransform) -> None:
    """Apply ``transform`` to every user-level id of a generically decoded request, in place.

    The one list of where identities live in a request: ``sanitise`` hashes them, ``replay``
    turns hashes back. A non-string value where an id belongs is dropped (it could be an id;
    the server reads no key from it either way). IP addresses and ``lat``/``lon`` go too.
    """
    user = body.get("user")
    if user is not None:
        if isinstance(user, dict):
            _map_field(user, "id", transform)
            _map_field(user, "buyeruid", transform)
            _map_eids(user, transform)
            ext = user.get("ext")
            if isinstance(ext, dict):
                _map_eids(ext, transform)
            _drop_geo(user)
        else:
            del body["user"]
    device = body.get("device")
    if device is not None:
        if isinstance(device, dict):
            ifa = device.get("ifa")
            if not isinstance(ifa, str) or not is_zero_ifa(ifa):  # all zeros: nobody
                if isinstance(ifa, str):
                    device["ifa"] = ifa.lower()  # the form its ``ifa:`` key takes
                _map_field(device, "ifa", transform)
            for name in _DEVICE_IDS:
                _map_field(device, name, transform)
            for name in _DEVICE_DROPPED:
                device.pop(name, None)
            _drop_geo(device)
        else:
            del body["device"]


def _map_field(parent: dict[str, Any], name: str, transform: IdTransform) -> None:
    value = parent.get(name)
    if value is None or value == "":
        return
    mapped = transform(value) if isinstance(value, str) else None
    if mapped is None:
        del parent[name]
    else:
        parent[name] = mapped


def _map_eids(parent: dict[str, Any], transform: IdTransform) -> None:
    eids = parent.get("eids")
    if eids is None:
        return
    if not isinstance(eids, list):
        del parent["eids"]
        return
    kept = []
    for eid in eids:
        if not isinstance(eid, dict):
            continue
        uids = eid.get("uids")
        if uids is not None:
            if isinstance(uids, list):
                eid["uids"] = [uid for uid in uids if isinstance(uid, dict)]
                for uid in eid["uids"]:
                    _map_field(uid, "id", transform)
            else:
                del eid["uids"]
        kept.append(eid)
    parent["eids"] = kept


def _drop_geo(parent: dict[str, Any]) -> None:
    geo = parent.get("geo")
    if isinstance(geo, dict):
        for name in _GEO_DROPPED:
            geo.pop(name, None)
    elif geo is not None:
        del parent["geo"]


def sanitise(body: bytes, key: bytes) -> dict[str, Any] | None:
    """The request ``body`` as a capture line holds it, or ``None`` when it is not a JSON
    object (nothing of it is kept)."""
    try:
        decoded = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None
    if not isinstance(decoded, dict):
        return None
    map_ids(decoded, lambda ident: hash_id(key, ident.encode("utf-8", "surrogatepass")))
    return decoded


class CaptureFiles:
    """This process's rotating capture files in one directory.

    A file is closed once it holds ``max_bytes``; on each rotation the oldest files beyond
    ``keep`` are removed among this process's and those of processes no longer running (a
    running worker's files are its own to rotate).
    """

    def __init__(self, directory: Path, max_bytes: int, keep: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.keep = keep
        self._pid = os.getpid()
        self._fd = -1
        self._size = 0
        self._number = 0

    def write(self, line: bytes) -> None:
        """Append one line (one ``write`` call: a reader never sees half of it)."""
        if self._fd < 0 or self._pid != os.getpid():  # first line, or a forked child
            self._open_next()
        elif self._size >= self.max_bytes:
            os.close(self._fd)
            self._open_next()
        written = os.write(self._fd, line)
        self._size += written
        if written != len(line):
            raise OSError(f"short write to {self.current()} ({written} of {len(line)} bytes)")

    def current(self) -> Path:
        """The file being written."""
        return self.directory / f"capture-{self._pid}-{self._number}.jsonl"

    def close(self) -> None:
        """Close the current file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _open_next(self) -> None:
        self._pid = os.getpid()
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            self._number += 1
            path = self.current()
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
                break
            except FileExistsError:  # left by an earlier process of the same pid
                continue
        self._size = 0
        self._remove_old()

    def _remove_old(self) -> None:
        ours = []
        for path in self.directory.glob(FILE_PATTERN):
            match = _FILE_NAME.fullmatch(path.name)
            if match is None:
                continue
            pid = int(match[1])
            if pid == self._pid or not _running(pid):
                try:
                    ours.append((path.stat().st_mtime, int(match[2]), path))
                except FileNotFoundError:  # removed meanwhile by another worker
                    continue
        ours.sort()
        for _, _, path in ours[: max(0, len(ours) - self.keep)]:
            if path != self.current():
                path.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class Capture:
    """Writes the sampled requests of one worker (``EnrichEndpoint.respond`` calls
    ``record`` when ``random() < sample``)."""

    def __init__(
        self,
        config: CaptureConfig,
        privacy: Privacy,
        held_out: Callable[[bytes], bool] | None = None,
    ) -> None:
        self.sample = config.sample
        self._key = config.key.encode()
        self._key_id = key_id(self._key)
        self._privacy = privacy
        self._held_out = held_out
        self.files = CaptureFiles(Path(config.path), config.max_bytes, config.keep)

    def record(self, body: bytes, status: int, answer: bytes) -> None:
        """Write the line of one answered request; never raises (capture goes off instead)."""
        try:
            line = self._line(body, status, answer)
            if line is not None:
                self.files.write(line)
        except Exception:
            self.sample = -1.0  # random() is never below it: the hot path stops calling
            self.files.close()
            log.exception("capture failed; capture is off until restart")

    def _line(self, body: bytes, status: int, answer: bytes) -> bytes | None:
        if status != 200:  # not JSON: nothing to replay
            return None
        sanitised = sanitise(body, self._key)
        if sanitised is None:
            return None
        request = decode(body)
        user_keys = request_keys(request)[0]
        held_out = bool(user_keys) and self._held_out is not None and self._held_out(user_keys[0])
        segments = len(_ANSWER.decode(answer).get("segment_ids", ()))
        record = {
            "v": FORMAT_VERSION,
            "ts": round(time.time(), 3),
            "key_id": self._key_id,
            "status": status,
            "segments": segments,
            "suppressed": self._privacy.suppression_reason(request),
            "holdout": held_out,
            "body": sanitised,
        }
        return _ENCODER.encode(record) + b"\n"


def capture_files(paths: Iterable[Path]) -> list[Path]:
    """The capture files named: files as given, directories by their ``capture-*.jsonl``."""
    out: list[Path] = []
    for path in paths:
        out.extend(sorted(path.glob(FILE_PATTERN)) if path.is_dir() else [path])
    return out


class CapturedRequest(msgspec.Struct):
    """One line of a capture file."""

    body: dict[str, Any]
    key_id: str
    status: int = 200
    segments: int = 0
    suppressed: str | None = None
    holdout: bool = False
    ts: float = 0.0
    v: int = FORMAT_VERSION


_LINE: Final = msgspec.json.Decoder(CapturedRequest)


def read_capture(paths: Iterable[Path]) -> Iterator[CapturedRequest]:
    """The captured requests of ``paths`` (files or directories), in file order.

    Raises ``ValueError`` naming the file and line of a line that is not a capture line.
    """
    for path in capture_files(paths):
        with path.open("rb") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    yield _LINE.decode(line)
                except msgspec.DecodeError as exc:
                    raise ValueError(f"{path}:{number}: not a capture line: {exc}") from None
