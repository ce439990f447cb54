from __future__ import annotations

from pathlib import Path

import pytest

from enrich_server.config import Config, from_json, load_config, options, to_json
from enrich_server.errors import ConfigError


def test_defaults() -> None:
    config = load_config()
    assert config.server.port == 8080
    assert config.server.host == "127.0.0.1"
    assert config.enrich.path == "/enrich"
    assert config.enrich.max_age == 86400
    assert config.enrich.max_body == 65536


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[server]\nport = 1000\nworkers = 3\nhost = "::1"\n[enrich]\nmax_age = 5\n')
    config = load_config(
        path,
        {"ENRICH_SERVER_PORT": "2000", "ENRICH_SERVER_WORKERS": "4", "HOME": "/x"},
        {"server.port": 3000, "server.workers": None},
    )
    assert config.server.port == 3000  # flag beats env beats file
    assert config.server.workers == 4  # env beats file; an absent flag changes nothing
    assert config.server.host == "::1"
    assert config.enrich.max_age == 5


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[server]\nprot = 1\n", "unknown key 'prot' in [server]"),
        ("[serve]\nport = 1\n", "unknown section [serve]"),
        ("server = 1\n", "server must be a table"),
        ('[server]\nport = "80"\n', "[server] port: expected int, got str"),
        ("[server]\nport = 70000\n", "[server] port: 70000 must be between 0 and 65535"),
        ("[server]\nworkers = 0\n", "[server] workers: 0 must be at least 1"),
        ('[enrich]\npath = "enrich"\n', "must be a path starting with /"),
        ("[server\n", "not valid TOML"),
        ('[replication]\nnats = ["http://x:1"]\n', "nats"),
        ('[replication]\nnats = ["nats://x:1"]\nbucket = "a.b"\n', "letters, digits"),
        ('[replication]\nnats = ["nats://x:1"]\ncheckpoint_every = 5\n', "0 (off) or 60"),
        ('[replication]\nnats = ["nats://x:1"]\nreplicas = 7\n', "must be 1-5"),
    ],
)
def test_bad_file_names_the_key(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"ENRICH_SERVER_PROT": "1"}, "unknown environment variable ENRICH_SERVER_PROT"),
        ({"ENRICH_SERVER_PORT": "eighty"}, "ENRICH_SERVER_PORT: 'eighty' is not a number"),
        ({"ENRICH_ENRICH_MAX_AGE": "-1"}, "ENRICH_ENRICH_MAX_AGE: -1 must not be negative"),
        (
            {"ENRICH_SERVER_HEADER_TIMEOUT": "0"},
            "ENRICH_SERVER_HEADER_TIMEOUT: 0.0 must be more than 0 and at most 3600 seconds",
        ),
        ({"ENRICH_SERVER_BODY_TIMEOUT": "nan"}, "ENRICH_SERVER_BODY_TIMEOUT: nan must be more"),
        ({"ENRICH_SERVER_BODY_TIMEOUT": "inf"}, "ENRICH_SERVER_BODY_TIMEOUT: inf must be more"),
        ({"ENRICH_SERVER_MAX_IDLE_CONNECTIONS": "0"}, "MAX_IDLE_CONNECTIONS: 0 must be at least"),
    ],
)
def test_bad_environment(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(environ=environ)


def test_bad_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--max-body: 0 must be at least 1"):
        load_config(flags={"enrich.max_body": 0})


def test_json_handoff_round_trip() -> None:
    config = load_config(flags={"server.port": 1234, "enrich.path": "/x"})
    assert from_json(to_json(config)) == config
    assert isinstance(from_json(to_json(config)), Config)


def test_every_option_documented() -> None:
    for key, env, _, doc in options():
        if key.startswith("[[platform]]."):
            assert env == "ENRICH_PLATFORM_<NAME>_" + key.split(".", 1)[1].upper()
        else:
            assert env == "ENRICH_" + key.replace(".", "_").upper()
        assert len(doc) > 10


def test_shipped_example_config_loads() -> None:
    config = load_config(Path(__file__).resolve().parent.parent / "deploy" / "enrich-server.toml")
    assert config.server.store == "/var/lib/enrich-server/segments.lmdb"
    assert config.enrich.path == "/enrich"
    (mapp,) = config.platforms
    assert (mapp.id, mapp.name, mapp.sync_hosts) == (99999, "mapp", ("go.flx1.com",))


def test_shipped_replication_example_loads_once_uncommented(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parent.parent / "deploy" / "enrich-server.toml").read_text()
    start = text.index("# [replication]")
    block = text[start : text.index("\n\n", start)]
    uncommented = text.replace(block, "\n".join(line[2:] for line in block.splitlines()))
    path = tmp_path / "replicated.toml"
    path.write_text(uncommented)
    config = load_config(path)
    assert config.replicated
    assert len(config.replication.nats) == 3
    assert (config.replication.replicas, config.replication.bucket) == (3, "enrich-snapshots")
    assert config.replication.checkpoint_every == 3600


def test_auth_and_privacy_tables(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[enrich]\nmax_age = 60\n[enrich.auth]\nheader = "X-Api-Key"\ntokens = ["a", "b"]\n'
        'oauth_clients = { index = "s" }\nallow_cidrs = ["203.0.113.0/24", "2001:db8::/32"]\n'
        "[privacy]\ngdpr_vendor_id = 42\ngdpr_purposes = [1, 2]\ngpp = false\n"
    )
    config = load_config(path)
    assert config.enrich.max_age == 60
    assert config.auth.header == "X-Api-Key"
    assert config.auth.tokens == ("a", "b")
    assert config.auth.oauth_clients == {"index": "s"}
    assert config.auth.allow_cidrs == ("203.0.113.0/24", "2001:db8::/32")
    assert (config.privacy.gdpr_vendor_id, config.privacy.gdpr_purposes) == (42, (1, 2))
    assert config.privacy.gpp is False
    assert from_json(to_json(config)) == config


def test_lists_maps_and_booleans_from_environment() -> None:
    config = load_config(
        environ={
            "ENRICH_ENRICH_AUTH_TOKENS": "t1, t2",
            "ENRICH_ENRICH_AUTH_OAUTH_CLIENTS": "index=s1,other=s2",
            "ENRICH_PRIVACY_GDPR_PURPOSES": "1,3",
            "ENRICH_PRIVACY_COPPA": "false",
        }
    )
    assert config.auth.tokens == ("t1", "t2")
    assert config.auth.oauth_clients == {"index": "s1", "other": "s2"}
    assert config.privacy.gdpr_purposes == (1, 3)
    assert config.privacy.coppa is False


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[enrich.auth]\nallow_cidrs = ["10.0.0.0/33"]\n', "not an IPv4 or IPv6 address or CIDR"),
        ("[enrich.auth]\ntokens = [1]\n", "expected a list of strings"),
        ('[enrich.auth]\ntokens = [""]\n', "has an empty entry"),
        ('[enrich.auth]\nheader = "X Api"\n', "is not an HTTP header name"),
        ("[enrich.auth]\nwho = 1\n", "unknown key 'who' in [enrich.auth]"),
        ("[privacy]\ngdpr_purposes = [0]\n", "has a purpose outside 1-24"),
        ('[privacy]\ngdpr = "yes"\n', "expected bool, got str"),
        ('[privacy]\nus_rules = "lax"\n', "must be one of strict, opt_outs"),
    ],
)
def test_bad_auth_and_privacy_values(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(path)


def test_bad_environment_list_and_map() -> None:
    with pytest.raises(ConfigError, match="expected id=value pairs"):
        load_config(environ={"ENRICH_ENRICH_AUTH_OAUTH_CLIENTS": "index"})
    with pytest.raises(ConfigError, match="is not true or false"):
        load_config(environ={"ENRICH_PRIVACY_GPP": "maybe"})


def test_platform_tables(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[[platform]]\nid = 1\nname = "mapp"\nbasic = "foo:bar"\nsync_hosts = ["a.example"]\n'
        '[[platform]]\nid = 2\nname = "other"\ntokens = ["t"]\nttl = 0\n'
    )
    config = load_config(
        path, {"ENRICH_PLATFORM_OTHER_HMAC_SECRET": "s", "ENRICH_PLATFORM_MAPP_TTL": "60"}
    )
    mapp, other = config.platforms
    assert (mapp.basic, mapp.ttl, mapp.sync_hosts) == ("foo:bar", 60, ("a.example",))
    assert (other.tokens, other.hmac_secret, other.ttl) == (("t",), "s", 0)
    assert config.platform(2) is other
    assert config.platform(3) is None
    assert from_json(to_json(config)) == config


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        ('[[platform]]\nname = "a"\n', {}, r"#1: id is required"),
        ("[[platform]]\nid = 1\n", {}, r"#1: name is required"),
        ('[[platform]]\nid = 1\nname = "a"\ncolour = 1\n', {}, "unknown key 'colour'"),
        ('[[platform]]\nid = 1\nname = "a b"\n', {}, "letters, digits or _"),
        ('[[platform]]\nid = 1\nname = "a"\nbasic = "nocolon"\n', {}, "user:password"),
        ('[[platform]]\nid = 1\nname = "a"\nsync_hosts = ["Evil.COM/x"]\n', {}, "lower-case host"),
        ('[[platform]]\nid = 0\nname = "a"\n', {}, "between 1 and"),
        ('[[platform]]\nid = 1\nname = "a"\n[[platform]]\nid = 1\nname = "b"\n', {}, "same id"),
        ('[[platform]]\nid = 1\nname = "a"\n[[platform]]\nid = 2\nname = "a"\n', {}, "same name"),
        ("[platform]\nid = 1\n", {}, "array of tables"),
        ('[[platform]]\nid = 1000000000\nname = "a"\n', {}, "between 1 and 999999999"),
        (
            '[[platform]]\nid = 1\nname = "a"\ntokens = ["t"]\n'
            '[[platform]]\nid = 2\nname = "b"\ntokens = ["t"]\n',
            {},
            "share an ingestion credential",
        ),
        (
            '[[platform]]\nid = 1\nname = "a"\n',
            {"ENRICH_PLATFORM_B_BASIC": "x:y"},
            "no \\[\\[platform\\]\\] of that name",
        ),
        ('[[platform]]\nid = 1\nname = "a"\n', {"ENRICH_PLATFORM_A_TTL": "soon"}, "not a number"),
    ],
)
def test_bad_platform_tables(
    tmp_path: Path, text: str, environ: dict[str, str], message: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ)


def test_replication_table(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[replication]\nnats = ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]\n'
        'bucket = "snaps_1"\ncheckpoint_every = 0\nreplicas = 3\n'
    )
    config = load_config(path, {"ENRICH_REPLICATION_MAX_LAG": "1.5"})
    assert config.replicated
    assert config.replication.nats == ("nats://10.0.0.1:4222", "nats://10.0.0.2:4222")
    assert config.replication.bucket == "snaps_1"
    assert config.replication.checkpoint_every == 0
    assert config.replication.replicas == 3
    assert config.replication.max_lag == 1.5
    assert not load_config(environ={}).replicated  # absent table: single node
    path.write_text('[replication]\nstream = "E"\n')
    with pytest.raises(ConfigError, match=r"\[replication\] needs nats"):
        load_config(path)
