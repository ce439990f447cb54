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
    assert config.enrich.max_body == 1048576


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
        assert env == "ENRICH_" + key.replace(".", "_").upper()
        assert len(doc) > 10


def test_shipped_example_config_loads() -> None:
    config = load_config(Path(__file__).resolve().parent.parent / "deploy" / "enrich-server.toml")
    assert config.server.store == "/var/lib/enrich-server/segments.lmdb"
    assert config.enrich.path == "/enrich"
