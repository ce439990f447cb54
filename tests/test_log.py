from __future__ import annotations

import json
import logging

from enrich_server.log import REDACTED, JsonFormatter, redacted


def test_redacted_masks_credentials_at_any_depth() -> None:
    config = {
        "server": {"port": 8080, "store": "/data"},
        "enrich": {"auth": {"header": "X-Api-Key", "tokens": ["t1", "t2"], "query": "token"}},
        "platform": [{"id": 1, "basic": "foo:bar", "plsec": "s", "hmac_secret": "", "name": "m"}],
        "oauth_keys": ["k1"],
    }
    assert redacted(config) == {
        "server": {"port": 8080, "store": "/data"},
        "enrich": {"auth": {"header": "X-Api-Key", "tokens": REDACTED, "query": "token"}},
        "platform": [
            {"id": 1, "basic": REDACTED, "plsec": REDACTED, "hmac_secret": "", "name": "m"}
        ],
        "oauth_keys": REDACTED,
    }


def test_json_formatter_one_object_with_extras() -> None:
    record = logging.makeLogRecord(
        {"name": "enrich_server", "levelname": "INFO", "msg": "loaded %d", "args": (3,),
         "store": "/data", "created": 0.0, "msecs": 5.0}
    )  # fmt: skip
    line = JsonFormatter().format(record)
    assert "\n" not in line
    event = json.loads(line)
    assert event == {
        "ts": "1970-01-01T00:00:00.005Z",
        "level": "info",
        "logger": "enrich_server",
        "msg": "loaded 3",
        "store": "/data",
    }
