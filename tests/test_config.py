"""Tests of node.config: defaults, the deploy example, every validation error,
and the config_to_dict -> config_from_dict round trip."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import re
import tomllib
from pathlib import Path

import pytest

from node.config import (
    Config,
    ConfigError,
    DatabaseSettings,
    Destination,
    JobSettings,
    NodeSettings,
    Protocol,
    SendSettings,
    TLSSettings,
    config_from_dict,
    config_to_dict,
    load_config,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "deploy" / "musclenode.toml"
CONFIG_MD = REPO / "deploy" / "CONFIG.md"

PACS = {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}


def _raises(data: dict, key: str) -> ConfigError:
    """config_from_dict(data) must fail, naming ``key``."""
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert key in str(info.value), str(info.value)
    assert info.value.key == key
    return info.value


# --------------------------------------------------------------------------- #
# Defaults                                                                      #
# --------------------------------------------------------------------------- #


def test_defaults_with_no_file():
    config = load_config(None)
    assert config == Config()
    assert config == config_from_dict({})
    assert config.node == NodeSettings()
    assert config.node.ae_title == "MUSCLENODE"
    assert config.node.bind_address == "0.0.0.0"
    assert config.node.port == 11112
    assert config.node.data_dir == Path("musclenode-data")
    assert config.node.complete_after_seconds == 10.0
    assert config.node.max_pdu_bytes == 0
    assert config.database == DatabaseSettings(url="")
    assert config.jobs == JobSettings(workers=1, executor="process", lease_seconds=600.0)
    assert config.send == SendSettings(5.0, 600.0, 30.0)
    assert config.destinations == ()


def test_default_database_url_is_sqlite_in_data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = Config()
    expected = tmp_path.resolve() / "musclenode-data" / "musclenode.db"
    assert config.database_url == f"sqlite:///{expected}"
    # data_dir stays relative as given; only the URL is resolved.
    assert not config.node.data_dir.is_absolute()


def test_explicit_database_url_is_used_as_is():
    url = "postgresql+psycopg://musclenode@127.0.0.1:5432/musclenode"
    config = config_from_dict({"database": {"url": url}})
    assert config.database_url == url


def test_settings_are_frozen():
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.node.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.destinations = ()  # type: ignore[misc]
    hash(config)  # frozen and made of hashable parts


def test_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("# nothing here\n")
    assert load_config(path) == Config()


def test_partial_file_keeps_other_defaults(tmp_path):
    path = tmp_path / "partial.toml"
    path.write_text('[node]\nport = 4006\n[jobs]\nexecutor = "inline"\n')
    config = load_config(str(path))
    assert config.node.port == 4006
    assert config.node.ae_title == "MUSCLENODE"
    assert config.jobs.executor == "inline"
    assert config.jobs.workers == 1


# --------------------------------------------------------------------------- #
# The deploy example                                                            #
# --------------------------------------------------------------------------- #


def test_deploy_example_loads_with_expected_values():
    config = load_config(EXAMPLE)
    assert config.node == NodeSettings(
        ae_title="MUSCLENODE",
        bind_address="0.0.0.0",
        port=11112,
        data_dir=Path("/var/lib/musclenode"),
        complete_after_seconds=10.0,
        max_pdu_bytes=0,
    )
    assert config.database.url == ""
    assert config.database_url == "sqlite:////var/lib/musclenode/musclenode.db"
    assert config.jobs == JobSettings(workers=2, executor="process", lease_seconds=600.0)
    assert config.send == SendSettings(
        retry_initial_seconds=5.0, retry_max_seconds=600.0, timeout_seconds=30.0
    )
    assert config.destinations == (Destination(**PACS),)
    assert config.destination("pacs").port == 4242
    with pytest.raises(KeyError):
        config.destination("nowhere")


TLS = TLSSettings(Path("/etc/musclenode/tls/node.crt"), Path("/etc/musclenode/tls/node.key"),
                  Path("/etc/musclenode/tls/ca.crt"), 2762, True)


def _dotted(data: dict, prefix: str = "") -> set[str]:
    """The dotted keys of a TOML document (the first entry of an array of tables)."""
    keys = set()
    for key, value in data.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            value = value[0]
        keys |= _dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
    return keys


def _all_dotted_keys(*, tls: bool = False) -> set[str]:
    """Every key, with those of [node.tls] when ``tls`` (a table left out by default)."""
    node = NodeSettings(tls=TLS) if tls else NodeSettings()
    return _dotted(config_to_dict(Config(node=node, destinations=(Destination(**PACS),),
                                         protocols=(Protocol("thigh", "THIGH", ("dixon_water",)),))))


def test_deploy_example_sets_every_key():
    """The example is 'fully commented': every key appears in it, set ([node.tls] as a
    commented table: a node copied from the example must start without certificates).
    """
    text = EXAMPLE.read_text()
    assert _dotted(tomllib.loads(text)) == _all_dotted_keys()
    start = text.index("\n# [node.tls]\n") + 1
    block = text[start:text.index("\n\n", start)]
    tls = tomllib.loads("\n".join(line.removeprefix("# ") for line in block.splitlines()
                                  if line.startswith("# ") and "=" in line or line == "# [node.tls]"))
    assert _dotted(tls) == {k for k in _all_dotted_keys(tls=True) if k.startswith("node.tls.")}
    assert config_from_dict(tls).node.tls == TLS


def test_config_md_documents_every_key():
    text = CONFIG_MD.read_text()
    documented = set(re.findall(r"^\|\s*`([a-z0-9_\[\]]+(?:\.[a-z0-9_]+)+)`", text, flags=re.M))
    documented = {k.replace("[]", "") for k in documented}
    assert documented == _all_dotted_keys(tls=True)


# --------------------------------------------------------------------------- #
# Errors                                                                        #
# --------------------------------------------------------------------------- #


def test_unknown_key_suggests_the_right_one():
    err = _raises({"node": {"prot": 11112}}, "node.prot")
    assert "unknown key" in str(err)
    assert "did you mean 'port'?" in str(err)
    assert str(err) == "node.prot: unknown key (did you mean 'port'?)"


def test_unknown_key_without_close_match():
    err = _raises({"send": {"zzzzzz": 1}}, "send.zzzzzz")
    assert "did you mean" not in str(err)


def test_web_table(tmp_path):
    """[web]: the coordinators' web service, off unless enabled; its keys are checked."""
    assert load_config(None).web.enabled is False
    path = tmp_path / "web.toml"
    path.write_text('[web]\nenabled = true\nport = 8081\n')
    web = load_config(path).web
    assert (web.enabled, web.bind_address, web.port) == (True, "127.0.0.1", 8081)
    err = _raises({"web": {"enabled": "yes"}}, "web.enabled")
    assert "true or false" in str(err)
    _raises({"web": {"port": 0}}, "web.port")


def test_unknown_table_suggests_the_right_one():
    err = _raises({"nodes": {}}, "nodes")
    assert "unknown table" in str(err)
    assert "did you mean 'node'?" in str(err)


def test_unknown_key_in_destination():
    _raises({"destinations": [dict(PACS, aet="X")]}, "destinations[0].aet")


def test_section_must_be_a_table():
    err = _raises({"node": 5}, "node")
    assert "expected a table" in str(err)


@pytest.mark.parametrize(
    "data, key, words",
    [
        ({"node": {"port": "11112x"}}, "node.port", "expected an integer, got string '11112x'"),
        ({"node": {"port": True}}, "node.port", "expected an integer, got boolean true"),
        ({"node": {"port": 11112.0}}, "node.port", "expected an integer, got float"),
        ({"node": {"ae_title": 42}}, "node.ae_title", "expected a string, got integer 42"),
        ({"node": {"bind_address": ["a"]}}, "node.bind_address", "expected a string"),
        ({"node": {"data_dir": 3}}, "node.data_dir", "got integer 3"),
        ({"node": {"complete_after_seconds": "10"}}, "node.complete_after_seconds",
         "expected a number"),
        ({"node": {"complete_after_seconds": False}}, "node.complete_after_seconds",
         "got boolean false"),
        ({"node": {"max_pdu_bytes": "0"}}, "node.max_pdu_bytes", "expected an integer"),
        ({"database": {"url": 5}}, "database.url", "expected a string"),
        ({"jobs": {"workers": 1.5}}, "jobs.workers", "expected an integer"),
        ({"jobs": {"workers": True}}, "jobs.workers", "boolean"),
        ({"jobs": {"executor": 1}}, "jobs.executor", "expected a string"),
        ({"jobs": {"lease_seconds": "600"}}, "jobs.lease_seconds", "expected a number"),
        ({"send": {"timeout_seconds": None}}, "send.timeout_seconds", "expected a number"),
        ({"destinations": [dict(PACS, port="4242")]}, "destinations[0].port",
         "expected an integer"),
        ({"destinations": [dict(PACS, host=127)]}, "destinations[0].host",
         "expected a string"),
    ],
)
def test_wrong_types(data, key, words):
    err = _raises(data, key)
    assert words in str(err)


def test_float_accepts_int():
    config = config_from_dict(
        {"node": {"complete_after_seconds": 3}, "jobs": {"lease_seconds": 60},
         "send": {"retry_initial_seconds": 1, "retry_max_seconds": 2, "timeout_seconds": 9}}
    )
    assert config.node.complete_after_seconds == 3.0
    assert isinstance(config.node.complete_after_seconds, float)
    assert isinstance(config.jobs.lease_seconds, float)
    assert isinstance(config.send.timeout_seconds, float)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_float_must_be_finite(value):
    err = _raises({"send": {"timeout_seconds": value}}, "send.timeout_seconds")
    assert "finite" in str(err)


@pytest.mark.parametrize(
    "title, words",
    [
        ("", "1 to 16 characters"),
        ("A" * 17, "1 to 16 characters"),
        ("    ", "all spaces"),
        ("MUSCLE\\NODE", "backslash"),
        ("MUSCLÉ", "printable ASCII"),
        ("TAB\tAE", "printable ASCII"),
    ],
)
def test_bad_ae_titles(title, words):
    err = _raises({"node": {"ae_title": title}}, "node.ae_title")
    assert words in str(err)
    err = _raises({"destinations": [dict(PACS, ae_title=title)]}, "destinations[0].ae_title")
    assert words in str(err)


@pytest.mark.parametrize("title", ["A", "A" * 16, "MY-AE_01", " PAD ", "a.b c"])
def test_good_ae_titles(title):
    assert config_from_dict({"node": {"ae_title": title}}).node.ae_title == title


@pytest.mark.parametrize("port", [0, -1, 65536, 100000])
def test_bad_ports(port):
    err = _raises({"node": {"port": port}}, "node.port")
    # 0 is "no plain port", which needs [node.tls]
    assert ("[node.tls]" if port == 0 else "between 1 and 65535") in str(err)
    _raises({"destinations": [dict(PACS, port=port)]}, "destinations[0].port")


@pytest.mark.parametrize("port", [1, 104, 65535])
def test_good_ports(port):
    config = config_from_dict({"node": {"port": port},
                               "destinations": [dict(PACS, port=port)]})
    assert config.node.port == config.destinations[0].port == port


@pytest.mark.parametrize("value", [0, 0.0, -1.5])
def test_complete_after_seconds_must_be_positive(value):
    err = _raises({"node": {"complete_after_seconds": value}}, "node.complete_after_seconds")
    assert "greater than 0" in str(err)


@pytest.mark.parametrize(
    "data, key",
    [
        ({"jobs": {"lease_seconds": 0}}, "jobs.lease_seconds"),
        ({"send": {"retry_initial_seconds": 0}}, "send.retry_initial_seconds"),
        ({"send": {"retry_max_seconds": -1}}, "send.retry_max_seconds"),
        ({"send": {"timeout_seconds": 0}}, "send.timeout_seconds"),
        ({"node": {"max_pdu_bytes": -1}}, "node.max_pdu_bytes"),
        ({"node": {"bind_address": ""}}, "node.bind_address"),
        ({"node": {"data_dir": ""}}, "node.data_dir"),
        ({"node": {"bind_address": " "}}, "node.bind_address"),
        ({"database": {"url": "not a url"}}, "database.url"),
        ({"destinations": [dict(PACS, host="")]}, "destinations[0].host"),
        ({"destinations": [dict(PACS, name="")]}, "destinations[0].name"),
    ],
)
def test_other_ranges(data, key):
    _raises(data, key)


def test_retry_max_not_below_initial():
    err = _raises({"send": {"retry_initial_seconds": 60, "retry_max_seconds": 30}},
                  "send.retry_max_seconds")
    assert "send.retry_initial_seconds" in str(err)


@pytest.mark.parametrize("workers", [0, -3])
def test_workers_at_least_one(workers):
    err = _raises({"jobs": {"workers": workers}}, "jobs.workers")
    assert "at least 1" in str(err)


def test_executor_must_be_known():
    err = _raises({"jobs": {"executor": "proces"}}, "jobs.executor")
    assert "'process'" in str(err) and "'inline'" in str(err)
    assert "did you mean 'process'?" in str(err)
    assert config_from_dict({"jobs": {"executor": "inline"}}).jobs.executor == "inline"


def test_destination_names_unique():
    second = dict(PACS, host="10.0.0.2")
    err = _raises({"destinations": [PACS, second]}, "destinations[1].name")
    assert "duplicate" in str(err) and "'pacs'" in str(err)
    assert "destinations[0]" in str(err)


@pytest.mark.parametrize("missing", ["name", "ae_title", "host", "port"])
def test_destination_keys_required(missing):
    entry = {k: v for k, v in PACS.items() if k != missing}
    err = _raises({"destinations": [PACS | {"name": "a"}, entry]}, f"destinations[1].{missing}")
    assert "required" in str(err)


def test_destinations_must_be_array_of_tables(tmp_path):
    # [destinations] written as a single table instead of [[destinations]]
    path = tmp_path / "single.toml"
    path.write_text('[destinations]\nname = "pacs"\nae_title = "ORTHANC"\n'
                    'host = "127.0.0.1"\nport = 4242\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "destinations"
    assert "array of tables" in str(info.value)
    assert "[[destinations]]" in str(info.value)
    # An array of something else.
    err = _raises({"destinations": ["pacs"]}, "destinations[0]")
    assert "expected a table" in str(err)


def test_top_level_must_be_table():
    with pytest.raises(ConfigError):
        config_from_dict([])  # type: ignore[arg-type]


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope" / "musclenode.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_toml_syntax_error_has_line_info(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[node]\nport = 11112\nae_title = "MUSCLENODE\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "line 3" in message


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[node]\nae_title = "MUSCLÉ"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "UTF-8" in str(info.value)


def test_file_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[node]\nprot = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: node.prot: unknown key (did you mean 'port'?)"
    assert info.value.source == str(path)


# --------------------------------------------------------------------------- #
# Round trip                                                                    #
# --------------------------------------------------------------------------- #


def _full_config() -> Config:
    return Config(
        node=NodeSettings("NODE1", "127.0.0.1", 4006, Path("rel/data"), 2.5, 65536, tls=TLS),
        database=DatabaseSettings("postgresql+psycopg://u@127.0.0.1:5432/db"),
        jobs=JobSettings(workers=4, executor="inline", lease_seconds=30.0),
        send=SendSettings(1.0, 60.0, 5.0),
        destinations=(
            Destination(**PACS),
            Destination("archive", "ARCHIVE", "pacs.example.org", 104, tls=True, tls_server_name="archive.example"),
        ),
    )


@pytest.mark.parametrize(
    "config",
    [Config(), _full_config(), load_config(EXAMPLE)],
    ids=["defaults", "full", "example"],
)
def test_round_trip(config):
    data = config_to_dict(config)
    again = config_from_dict(copy.deepcopy(data))
    assert again == config
    assert config_to_dict(again) == data
    # Plain, picklable data, as handed to worker processes.
    assert config_from_dict(pickle.loads(pickle.dumps(data))) == config
    assert isinstance(data["node"]["data_dir"], str)
    assert isinstance(data["destinations"], list)


def test_round_trip_keeps_relative_data_dir():
    config = config_from_dict(config_to_dict(_full_config()))
    assert config.node.data_dir == Path("rel/data")
    assert not config.node.data_dir.is_absolute()


def test_round_trip_through_toml_text(tmp_path):
    """config_to_dict output is valid TOML data: write it by hand and read it back."""
    data = config_to_dict(_full_config())
    lines = []
    for table, body in data.items():
        if table in ("destinations", "protocols"):
            continue
        lines.append(f"[{table}]")
        subtables = {k: v for k, v in body.items() if isinstance(v, dict)}
        for key, value in body.items():
            if key not in subtables:
                lines.append(f"{key} = {_toml_value(value)}")
        for key, sub in subtables.items():
            lines.append(f"[{table}.{key}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in sub.items()]
    for dest in data["destinations"]:
        lines.append("[[destinations]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in dest.items()]
    path = tmp_path / "rt.toml"
    path.write_text("\n".join(lines) + "\n")
    assert load_config(path) == _full_config()


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


# --------------------------------------------------------------------------- #
# Configurations embedded in the other deploy files stay valid                 #
# --------------------------------------------------------------------------- #


def test_config_md_example_is_valid():
    text = CONFIG_MD.read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        config = config_from_dict(tomllib.loads(block), source="CONFIG.md")
        assert config.destinations


def test_compose_embedded_config_is_valid():
    """The inline config of deploy/compose.yaml: the node sends to Orthanc and
    records into PostgreSQL, by compose service names."""
    lines = (REPO / "deploy" / "compose.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "content: |") + 1
    body = []
    for line in lines[start:]:
        if line.strip() and not line.startswith("      "):
            break
        body.append(line[6:])
    config = config_from_dict(tomllib.loads("\n".join(body)), source="compose")
    assert config.database.url.startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in config.database.url
    assert [(d.host, d.port, d.ae_title) for d in config.destinations] == [
        ("orthanc", 4242, "ORTHANC")
    ]
    assert config.node.data_dir == Path("/var/lib/musclenode")


def test_dockerfile_embedded_config_is_valid():
    text = (REPO / "deploy" / "Dockerfile").read_text()
    block = text[text.index("RUN printf") : text.index("> /etc/musclenode/musclenode.toml")]
    toml_lines = re.findall(r"^\s*'(.*)' \\$", block, flags=re.M)
    config = config_from_dict(tomllib.loads("\n".join(toml_lines)),
                              source="Dockerfile")
    assert config.node.port == 11112
    assert config.node.data_dir == Path("/var/lib/musclenode")
    assert re.search(r"^EXPOSE 11112$", text, flags=re.M)
