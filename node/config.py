"""Configuration of the musclenode node, read from a TOML file.

Every setting has a default, so the node runs with no file at all. A file only
needs the keys it changes::

    [node]
    ae_title = "MUSCLENODE"
    port = 11112

    [[destinations]]
    name = "pacs"
    ae_title = "ORTHANC"
    host = "127.0.0.1"
    port = 4242

Validation is strict: unknown tables and keys, values of the wrong type and
values out of range raise :class:`ConfigError`, whose message always names the
offending key in dotted form (``node.port``, ``destinations[1].host``).

See ``deploy/CONFIG.md`` for the table of every key and ``deploy/musclenode.toml``
for a commented example.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

from quant.enums import Model, SeriesKind

if TYPE_CHECKING:
    from quant.t2stage import T2Options

__all__ = [
    "AllowedCaller",
    "Config",
    "ConfigError",
    "DatabaseSettings",
    "Destination",
    "JobSettings",
    "NodeSettings",
    "Protocol",
    "PROTOCOL_SERIES_KINDS",
    "SendSettings",
    "T2Settings",
    "TLSSettings",
    "config_from_dict",
    "config_to_dict",
    "load_config",
]


class ConfigError(Exception):
    """A configuration value is missing, unknown, of the wrong type or out of range.

    ``key`` is the dotted key at fault (``"node.port"``, ``"destinations[0].host"``),
    or ``None`` for errors about the file as a whole; ``problem`` says what is
    wrong; ``source`` is where the configuration came from (a file path, or
    ``None`` for a plain dict). ``str(error)`` reads
    ``"<source>: <key>: <problem>"``, leaving out the parts that are ``None``.
    """

    def __init__(self, key: str | None, problem: str, *, source: str | None = None):
        self.key = key
        self.problem = problem
        self.source = source
        parts = [p for p in (source, key, problem) if p]
        super().__init__(": ".join(parts))


# --------------------------------------------------------------------------- #
# Settings                                                                      #
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class AllowedCaller:
    """One entry of ``node.allowed_calling_aes``: a calling AE title, and optionally the host
    (IP address or host name) its associations must come from (``""``: any host).
    """

    ae: str
    host: str = ""


@dataclass(frozen=True)
class TLSSettings:
    """``[node.tls]``: DICOM TLS (PS3.15 B.1): a second listening port whose associations run over
    TLS 1.2 or later, and the certificates the node also uses when it associates with a
    destination marked ``tls = true`` (as its client certificate, and the CA it verifies the
    destination's certificate against). Files are PEM; they are read when the node starts
    (see :mod:`node.tls`).
    """

    certificate: Path               # the node's certificate (chain), PEM
    private_key: Path               # its private key, PEM, not encrypted
    ca_certificates: Path           # the CA certificate(s) peers' certificates must chain to, PEM
    port: int = 2762                # the DICOM TLS port (IANA "dicom-tls")
    require_client_certificate: bool = True   # refuse a peer without a certificate signed by the CA


@dataclass(frozen=True)
class NodeSettings:
    """``[node]``: the DICOM storage SCP that receives series (``port = 0``: no plain port,
    only the TLS one of ``[node.tls]``).

    ``allowed_calling_aes`` lists who may associate (empty: anyone); ``require_called_ae_title``
    refuses associations whose Called AE Title is not ``ae_title``.
    """

    ae_title: str = "MUSCLENODE"
    bind_address: str = "0.0.0.0"
    port: int = 11112
    data_dir: Path = Path("musclenode-data")
    complete_after_seconds: float = 10.0
    max_pdu_bytes: int = 0  # 0 = unlimited
    journal_mb: int = 256   # the ingest journal (node.ingest), MiB; 0 = none: each instance stored before its answer
    allowed_calling_aes: tuple[AllowedCaller, ...] = ()   # () = any calling AE from any host
    require_called_ae_title: bool = True
    tls: TLSSettings | None = None   # [node.tls]; None: no TLS port, no TLS to destinations
    # what this process runs: "receiver" (SCP + completion), "worker" (jobs + sends + completion),
    # "all" (everything: a single node); ``musclenode serve --role`` overrides it
    role: str = "all"


@dataclass(frozen=True)
class DatabaseSettings:
    """``[database]``: where series, jobs and results are recorded."""

    url: str = ""  # "" = SQLite file <data_dir>/musclenode.db


@dataclass(frozen=True)
class JobSettings:
    """``[jobs]``: the quantification workers."""

    workers: int = 1
    executor: str = "process"  # "process", "inline" or "dask"
    lease_seconds: float = 600.0
    max_attempts: int = 3   # a job whose worker dies (or that crashes) this many times is failed
    scheduler_address: str = ""   # executor "dask": the Dask scheduler, "tcp://host:8786"


@dataclass(frozen=True)
class SendSettings:
    """``[send]``: C-STORE of results to the destinations."""

    retry_initial_seconds: float = 5.0
    retry_max_seconds: float = 600.0
    timeout_seconds: float = 30.0
    query_timeout_seconds: float = 5.0   # C-FIND and C-GET of a subject's earlier SRs (destinations with query)


@dataclass(frozen=True)
class T2Settings:
    """``[t2]``: water T2 from multi-echo spin-echo series."""

    model: str = Model.EPG_BICOMPONENT.value  # or Model.BIEXP_FIXED_FAT (the UCL fallback)
    profile: str = "auto"                     # "auto": sinc for 2D, none for 3D; "sinc"; "none"
    time_bandwidth: float = 2.0               # of the excitation and refocusing pulses (sinc profile)
    refocusing_to_excitation_slab_ratio: float = 0.0   # 0: quant.epg's default for product sequences
    refocusing_angle_deg: float = 0.0         # 0: from the header (Flip Angle > 90), else 180
    fat_t2_ms: float = 0.0                    # 0: calibrate per exam on subcutaneous fat

    def options(self) -> T2Options:
        """The :class:`quant.t2stage.T2Options` these settings describe."""
        from quant.t2stage import T2Options
        return T2Options(model=self.model, profile=self.profile, time_bandwidth=self.time_bandwidth,
                         refocusing_to_excitation_slab_ratio=self.refocusing_to_excitation_slab_ratio or None,
                         refocusing_angle_deg=self.refocusing_angle_deg or None,
                         fat_t2_ms=self.fat_t2_ms or None)


@dataclass(frozen=True)
class WebSettings:
    """``[web]``: the coordinators' web API and dashboard (FastAPI, uvicorn), in ``musclenode serve``."""

    enabled: bool = False
    bind_address: str = "127.0.0.1"
    port: int = 8080


@dataclass(frozen=True)
class RoiSettings:
    """``[rois]``: what a thigh or calf visit without a reader's ROIs is measured in besides
    the whole leg (a reader's own or carried ROIs always come first).
    """

    compartments: bool = True   # automatic compartments (bone landmarks + watershed on the FF)
    atlases: int = 3            # up to this many other subjects' reader sets, fused (2 at least); 0: off


@dataclass(frozen=True)
class Destination:
    """One ``[[destinations]]`` entry: a DICOM peer that receives every result (the summary
    page as Encapsulated PDF only with ``pdf = true``); with ``query`` the node also asks it
    for a subject's earlier musclenode SRs (C-FIND, then C-GET) when it has no earlier visit
    of that subject itself (see :mod:`node.history`).
    """

    name: str
    ae_title: str
    host: str
    port: int
    query: bool = False
    pdf: bool = False   # also send the summary page as Encapsulated PDF (the Secondary Capture goes to all)
    tls: bool = False   # associate over DICOM TLS with [node.tls]'s certificate, verifying the peer's
    tls_server_name: str = ""   # the name its certificate must carry; "": ``host`` (a DNS name or an IP)


#: The series-kind names a protocol's ``expects`` may list, and the kind of
#: :class:`quant.enums.SeriesKind` each stands for (deploy/CONFIG.md lists them).
PROTOCOL_SERIES_KINDS: dict[str, SeriesKind] = {
    "dixon_water": SeriesKind.WATER,
    "dixon_fat": SeriesKind.FAT,
    "dixon_in_phase": SeriesKind.IN_PHASE,
    "dixon_opposed_phase": SeriesKind.OPPOSED_PHASE,
    "mese": SeriesKind.MESE,                  # multi-echo spin echo (water T2)
    "megre": SeriesKind.MEGRE_MAGNITUDE,      # multi-echo gradient echo, magnitude images
    "megre_phase": SeriesKind.MEGRE_PHASE,    # multi-echo gradient echo, phase images
}


@dataclass(frozen=True)
class Protocol:
    """One ``[[protocols]]`` entry: a study whose Study Description, a Series Description
    or Body Part Examined matches ``match`` (a regular expression, searched, case-insensitive)
    is ready, and processed at once, when a complete series of every kind in ``expects``
    (names of :data:`PROTOCOL_SERIES_KINDS`) has arrived (see :mod:`node.completion`).
    """

    name: str
    match: str
    expects: tuple[str, ...]

    @property
    def pattern(self) -> re.Pattern:
        """``match`` compiled (case-insensitive)."""
        return re.compile(self.match, re.IGNORECASE)

    @property
    def kinds(self) -> frozenset[SeriesKind]:
        """The series kinds ``expects`` names."""
        return frozenset(PROTOCOL_SERIES_KINDS[name] for name in self.expects)


@dataclass(frozen=True)
class Config:
    """The whole configuration. ``Config()`` is the all-defaults configuration."""

    node: NodeSettings = field(default_factory=NodeSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    jobs: JobSettings = field(default_factory=JobSettings)
    send: SendSettings = field(default_factory=SendSettings)
    t2: T2Settings = field(default_factory=T2Settings)
    rois: RoiSettings = field(default_factory=RoiSettings)
    web: WebSettings = field(default_factory=WebSettings)
    destinations: tuple[Destination, ...] = ()
    protocols: tuple[Protocol, ...] = ()

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL to use: ``database.url``, or by default an SQLite
        file ``musclenode.db`` in ``node.data_dir`` (made absolute against the
        current directory).
        """
        if self.database.url:
            return self.database.url
        return f"sqlite:///{self.node.data_dir.resolve() / 'musclenode.db'}"

    def destination(self, name: str) -> Destination:
        """The destination called ``name``; ``KeyError`` if there is none."""
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)


# --------------------------------------------------------------------------- #
# Validation                                                                    #
# --------------------------------------------------------------------------- #

# Tables that hold a single settings object, in file order.
_SECTIONS: dict[str, type] = {
    "node": NodeSettings,
    "database": DatabaseSettings,
    "jobs": JobSettings,
    "send": SendSettings,
    "t2": T2Settings,
    "rois": RoiSettings,
    "web": WebSettings,
}
_TOP_LEVEL = (*_SECTIONS, "destinations", "protocols")
# Tables inside a section: (section, key) -> settings class ([node.tls]).
_SUBTABLES: dict[tuple[str, str], type] = {("node", "tls"): TLSSettings}

EXECUTORS = ("process", "inline", "dask")
#: ``[node] role`` (and ``musclenode serve --role``): what one node process runs (README "Several nodes").
ROLES = ("all", "receiver", "worker")

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def _check_ae_title(value: str) -> str | None:
    if not 1 <= len(value) <= 16:
        return f"an AE title must be 1 to 16 characters, got {len(value)} ({value!r})"
    if any(not (0x20 <= ord(ch) <= 0x7E) for ch in value):
        return f"an AE title must be printable ASCII, got {value!r}"
    if "\\" in value:
        return f"an AE title must not contain a backslash, got {value!r}"
    if not value.strip(" "):
        return "an AE title must not be all spaces"
    return None


def _check_port(value: int) -> str | None:
    if not 1 <= value <= 65535:
        return f"a port must be between 1 and 65535, got {value}"
    return None


def _check_port_or_zero(value: int) -> str | None:
    if not 0 <= value <= 65535:
        return f"a port must be between 1 and 65535 (or 0 for none), got {value}"
    return None


def _check_not_empty(value: str | Path) -> str | None:
    if not str(value).strip():
        return "must not be empty"
    return None


def _positive(value: float) -> str | None:
    if not value > 0:
        return f"must be greater than 0, got {value!r}"
    return None


def _at_least(minimum: int) -> Callable[[int], str | None]:
    def check(value: int) -> str | None:
        if value < minimum:
            return f"must be at least {minimum}, got {value}"
        return None

    return check


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if value not in choices:
            hint = _did_you_mean(value, choices)
            listed = ", ".join(repr(c) for c in choices)
            return f"must be one of {listed}, got {value!r}{hint}"
        return None

    return check


def _check_database_url(value: str) -> str | None:
    if value and not _URL_SCHEME.match(value):
        return (
            "expected an SQLAlchemy URL such as "
            "'postgresql+psycopg://user@127.0.0.1:5432/musclenode' "
            f"(or \"\" for the SQLite default), got {value!r}"
        )
    return None


_SCHEDULER_ADDRESS = re.compile(r"^([a-z]+://)?[^\s/]+:\d+$")


def _check_scheduler_address(value: str) -> str | None:
    if value and not _SCHEDULER_ADDRESS.match(value):
        return f'expected a Dask scheduler address such as "tcp://10.0.0.5:8786", got {value!r}'
    return None


def _journal_mb(value: int) -> str | None:
    if value != 0 and value < 2:
        return f"expected 0 (no journal) or at least 2 (MiB), got {value}"
    return None


# (table, key) -> extra check run after the type check.
_CHECKS: dict[tuple[str, str], Callable[[Any], str | None]] = {
    ("node", "ae_title"): _check_ae_title,
    ("node", "bind_address"): _check_not_empty,
    ("node", "port"): _check_port_or_zero,
    ("node.tls", "port"): _check_port,
    ("node", "complete_after_seconds"): _positive,
    ("node", "max_pdu_bytes"): _at_least(0),
    ("node", "journal_mb"): _journal_mb,
    ("node", "role"): _one_of(ROLES),
    ("database", "url"): _check_database_url,
    ("jobs", "workers"): _at_least(1),
    ("jobs", "executor"): _one_of(EXECUTORS),
    ("jobs", "lease_seconds"): _positive,
    ("jobs", "max_attempts"): _at_least(1),
    ("jobs", "scheduler_address"): _check_scheduler_address,
    ("send", "retry_initial_seconds"): _positive,
    ("send", "retry_max_seconds"): _positive,
    ("send", "timeout_seconds"): _positive,
    ("send", "query_timeout_seconds"): _positive,
    ("t2", "model"): _one_of(tuple(m.value for m in (Model.EPG_BICOMPONENT, Model.BIEXP_FIXED_FAT))),
    ("t2", "profile"): _one_of(("auto", "sinc", "none")),
    ("t2", "time_bandwidth"): _positive,
    ("t2", "refocusing_to_excitation_slab_ratio"): _at_least(0),
    ("t2", "refocusing_angle_deg"): _at_least(0),
    ("t2", "fat_t2_ms"): _at_least(0),
    ("rois", "atlases"): _at_least(0),
    ("web", "bind_address"): _check_not_empty,
    ("web", "port"): _check_port,
    ("destinations", "name"): _check_not_empty,
    ("destinations", "ae_title"): _check_ae_title,
    ("destinations", "host"): _check_not_empty,
    ("destinations", "port"): _check_port,
}


def _parse_allowed_callers(value: Any, dotted: str) -> tuple[AllowedCaller, ...]:
    """``node.allowed_calling_aes``: AE title strings or ``{ ae = "...", host = "..." }`` tables; an entry
    at fault raises :class:`ConfigError` naming it (``node.allowed_calling_aes[1].host``).
    """
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected an array of AE titles or {{ ae = ..., host = ... }} tables, got {_describe(value)}")
    out = []
    for i, entry in enumerate(value):
        where = f"{dotted}[{i}]"
        if isinstance(entry, AllowedCaller):
            entry = {"ae": entry.ae, "host": entry.host} if entry.host else entry.ae
        if isinstance(entry, str):
            entry = {"ae": entry}
        if not isinstance(entry, dict):
            raise ConfigError(where, f"expected an AE title or a table {{ ae = ..., host = ... }}, "
                                     f"got {_describe(entry)}")
        for key in entry:
            if key not in ("ae", "host"):
                raise ConfigError(f"{where}.{key}", f"unknown key{_did_you_mean(key, ('ae', 'host'))}")
        if "ae" not in entry:
            raise ConfigError(f"{where}.ae", "required key missing")
        ae, host = entry["ae"], entry.get("host", "")
        if not isinstance(ae, str):
            raise ConfigError(f"{where}.ae", f"expected a string, got {_describe(ae)}")
        if not isinstance(host, str):
            raise ConfigError(f"{where}.host", f"expected a string, got {_describe(host)}")
        problem = _check_ae_title(ae)
        if problem:
            raise ConfigError(f"{where}.ae", problem)
        if "host" in entry and not host.strip():
            raise ConfigError(f"{where}.host", "must not be empty (leave the key out for any host)")
        out.append(AllowedCaller(ae.strip(), host.strip()))
    return tuple(out)


# (table, key) -> parser of a value that is not a plain str/int/float/bool/path; raises
# TypeError or ValueError with the problem.
_PARSERS: dict[tuple[str, str], Callable[[Any, str], Any]] = {
    ("node", "allowed_calling_aes"): _parse_allowed_callers,
}


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe(value: Any) -> str:
    """How a value is named in an error message: ``string '11112x'``."""
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"{type(value).__name__} {value!r}"


_EXPECTED = {str: "a string", int: "an integer", float: "a number", Path: "a path string", bool: "true or false"}


def _coerce(value: Any, kind: type) -> Any:
    """``value`` converted to ``kind``, or raise ``TypeError``."""
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"expected a finite number, got {value!r}")
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    elif kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is Path:
        if isinstance(value, (str, Path)):
            if not str(value).strip():
                raise ValueError("must not be empty")
            return Path(value)
    else:  # pragma: no cover - programming error
        raise AssertionError(f"unsupported setting type {kind!r}")
    raise TypeError(f"expected {_EXPECTED[kind]}, got {_describe(value)}")


def _build(cls: type, table: str, prefix: str, data: Any, source: str | None) -> Any:
    """Build settings class ``cls`` from the TOML table ``data`` found at ``prefix``."""
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"expected a table, got {_describe(data)}", source=source)
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(
                f"{prefix}.{key}", f"unknown key{_did_you_mean(key, names)}", source=source
            )
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        dotted = f"{prefix}.{f.name}"
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(dotted, "required key missing", source=source)
            continue
        sub = _SUBTABLES.get((table, f.name))
        if sub is not None:
            kwargs[f.name] = _build(sub, f"{table}.{f.name}", dotted, data[f.name], source)
            continue
        try:
            parse = _PARSERS.get((table, f.name))
            value = parse(data[f.name], dotted) if parse else _coerce(data[f.name], hints[f.name])
        except ConfigError as exc:
            raise ConfigError(exc.key, exc.problem, source=source) from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(dotted, str(exc), source=source) from None
        check = _CHECKS.get((table, f.name))
        problem = check(value) if check else None
        if problem:
            raise ConfigError(dotted, problem, source=source)
        kwargs[f.name] = value
    return cls(**kwargs)


def config_from_dict(data: dict, *, source: str = "<dict>") -> Config:
    """Validate a parsed TOML document (or the output of :func:`config_to_dict`)
    and return the :class:`Config`. ``source`` names where it came from in error
    messages; the default ``"<dict>"`` is left out of them.
    """
    src = None if source == "<dict>" else str(source)
    if not isinstance(data, dict):
        raise ConfigError(None, f"expected a table at the top level, got {_describe(data)}",
                          source=src)
    for key in data:
        if key not in _TOP_LEVEL:
            raise ConfigError(key, f"unknown table{_did_you_mean(key, _TOP_LEVEL)}", source=src)

    sections = {
        name: _build(cls, name, name, data.get(name, {}), src)
        for name, cls in _SECTIONS.items()
    }

    raw_dests = data.get("destinations", [])
    if not isinstance(raw_dests, (list, tuple)):
        raise ConfigError(
            "destinations",
            f"expected an array of tables ([[destinations]]), got {_describe(raw_dests)}",
            source=src,
        )
    destinations: list[Destination] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(raw_dests):
        prefix = f"destinations[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(
                prefix,
                f"expected a table ([[destinations]]), got {_describe(entry)}",
                source=src,
            )
        dest = _build(Destination, "destinations", prefix, entry, src)
        if dest.name in seen:
            raise ConfigError(
                f"{prefix}.name",
                f"duplicate destination name {dest.name!r} "
                f"(also destinations[{seen[dest.name]}].name)",
                source=src,
            )
        seen[dest.name] = index
        destinations.append(dest)

    node: NodeSettings = sections["node"]
    if node.tls is None:
        if node.port == 0 and node.role != "worker":   # a worker opens no DICOM port anyway
            raise ConfigError("node.port", "0 (no plain port) needs a [node.tls] table: the node would not listen",
                              source=src)
        for index, dest in enumerate(destinations):
            if dest.tls:
                raise ConfigError(f"destinations[{index}].tls",
                                  "true needs a [node.tls] table (the node's certificate, its private key and "
                                  "the CA certificates)", source=src)
    elif node.tls.port == node.port:
        raise ConfigError("node.tls.port", f"must differ from node.port ({node.port})", source=src)

    send: SendSettings = sections["send"]
    if send.retry_max_seconds < send.retry_initial_seconds:
        raise ConfigError(
            "send.retry_max_seconds",
            f"must be at least send.retry_initial_seconds ({send.retry_initial_seconds!r}), "
            f"got {send.retry_max_seconds!r}",
            source=src,
        )

    jobs: JobSettings = sections["jobs"]
    if jobs.executor == "dask" and not jobs.scheduler_address.strip():
        raise ConfigError("jobs.scheduler_address", 'required with jobs.executor = "dask": the Dask scheduler, '
                          'e.g. "tcp://10.0.0.5:8786"', source=src)

    protocols = _protocols(data.get("protocols", []), src)
    return Config(destinations=tuple(destinations), protocols=protocols, **sections)


def _protocols(raw: Any, src: str | None) -> tuple[Protocol, ...]:
    """The ``[[protocols]]`` entries, validated: a name (unique), a regular expression that
    compiles, and a non-empty list of known series-kind names without repeats.
    """
    if not isinstance(raw, (list, tuple)):
        raise ConfigError("protocols", f"expected an array of tables ([[protocols]]), got {_describe(raw)}",
                          source=src)
    out: list[Protocol] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(raw):
        prefix = f"protocols[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(prefix, f"expected a table ([[protocols]]), got {_describe(entry)}", source=src)
        for key in entry:
            if key not in ("name", "match", "expects"):
                raise ConfigError(f"{prefix}.{key}",
                                  f"unknown key{_did_you_mean(key, ('name', 'match', 'expects'))}", source=src)
        for key in ("name", "match", "expects"):
            if key not in entry:
                raise ConfigError(f"{prefix}.{key}", "required key missing", source=src)
        for key in ("name", "match"):
            if not isinstance(entry[key], str):
                raise ConfigError(f"{prefix}.{key}", f"expected a string, got {_describe(entry[key])}", source=src)
        name, match, expects = entry["name"], entry["match"], entry["expects"]
        if not name.strip():
            raise ConfigError(f"{prefix}.name", "must not be empty", source=src)
        if name in seen:
            raise ConfigError(f"{prefix}.name", f"duplicate protocol name {name!r} (also protocols[{seen[name]}].name)",
                              source=src)
        if not match.strip():
            raise ConfigError(f"{prefix}.match", "must not be empty (it would match every study)", source=src)
        try:
            re.compile(match, re.IGNORECASE)
        except re.error as exc:
            raise ConfigError(f"{prefix}.match", f"not a valid regular expression: {exc} (in {match!r})",
                              source=src) from None
        if not isinstance(expects, (list, tuple)) or not expects:
            raise ConfigError(f"{prefix}.expects", "expected a non-empty array of series-kind names, got "
                              f"{_describe(expects)}", source=src)
        for i, kind in enumerate(expects):
            if not isinstance(kind, str):
                raise ConfigError(f"{prefix}.expects[{i}]", f"expected a string, got {_describe(kind)}", source=src)
            if kind not in PROTOCOL_SERIES_KINDS:
                listed = ", ".join(PROTOCOL_SERIES_KINDS)
                raise ConfigError(f"{prefix}.expects[{i}]", f"unknown series kind {kind!r}"
                                  f"{_did_you_mean(kind, PROTOCOL_SERIES_KINDS)}; known kinds: {listed}", source=src)
            if kind in expects[:i]:
                raise ConfigError(f"{prefix}.expects[{i}]", f"series kind {kind!r} is listed twice", source=src)
        seen[name] = index
        out.append(Protocol(name=name, match=match, expects=tuple(expects)))
    return tuple(out)


def load_config(path: str | Path | None) -> Config:
    """Read and validate the TOML file at ``path``; ``None`` gives all defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(None, "configuration file not found", source=str(path)) from None
    except IsADirectoryError:
        raise ConfigError(None, "configuration path is a directory, not a file",
                          source=str(path)) from None
    except OSError as exc:
        raise ConfigError(None, f"cannot read configuration file: {exc.strerror or exc}",
                          source=str(path)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(None, f"not UTF-8 text: {exc}", source=str(path)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends with "(at line N, column M)".
        raise ConfigError(None, f"invalid TOML: {exc}", source=str(path)) from None
    return config_from_dict(data, source=str(path))


def config_to_dict(config: Config) -> dict:
    """A plain dict of TOML-compatible values (str, int, float, bool, lists,
    dicts) that :func:`config_from_dict` turns back into an equal ``Config``.
    Used to hand the configuration to worker processes.
    """
    out: dict[str, Any] = {name: _table(getattr(config, name)) for name in _SECTIONS}
    out["destinations"] = [_table(dest) for dest in config.destinations]
    out["protocols"] = [_table(p) for p in config.protocols]
    return out


def _table(settings: Any) -> dict[str, Any]:
    """One settings object as a TOML table; a sub-table that is not set (None) is left out."""
    return {f.name: _plain(getattr(settings, f.name)) for f in fields(settings)
            if getattr(settings, f.name) is not None}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, AllowedCaller):
        return {"ae": value.ae, "host": value.host} if value.host else value.ae
    if isinstance(value, Path):
        return str(value)
    if is_dataclass(value):
        return _table(value)
    return value
