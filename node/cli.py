"""The ``musclenode`` command.

Exit codes: 0 success; 1 the work failed (see the message); 2 bad usage or configuration (a database
made by a newer version, too).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import CHATTY_LOGGERS
from .config import ROLES, ConfigError, load_config
from .db import JobState, OutboxState, StudyState
from .errors import SchemaError
from .text import install_safe_formatter, printable

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

log = logging.getLogger("musclenode")


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_safe_formatter()
    if verbosity <= 0:
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def cmd_serve(args: argparse.Namespace) -> int:
    """``musclenode serve``: run the node until SIGINT or SIGTERM; returns 0."""
    from dataclasses import replace

    from .service import Node
    config = load_config(args.config)
    if getattr(args, "role", None):   # --role wins over [node] role
        config = replace(config, node=replace(config.node, role=args.role))
    node = Node(config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node.start()
    web = f"; web on http://{config.web.bind_address}:{node.web.port}" if node.web is not None else ""
    role = config.node.role
    if node.receives:
        where = f"listening on {node.listening()}" + (f" (role {role})" if role != "all" else "")
    else:
        where = f"running jobs and sends (role {role}, no DICOM port)"
    print(f"musclenode {config.node.ae_title} {where}; data in {config.node.data_dir}{web}", flush=True)
    stop.wait()
    node.stop()
    return 0


def _fmt_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _rois_line(r: dict) -> str:
    """One study's ROIs in words, e.g. "5 carried from SEG 1.2.3: Dice 0.95, mismatch 0.08, REVIEW"."""
    text = f"{r['n_rois']} {r['source']}" + (f" from SEG {printable(r['seg_sop_uid'])}" if r["seg_sop_uid"] else "")
    if r["source"] == "carried":
        dice = "n/a" if r["dice"] is None else f"{r['dice']:.3f}"
        text += (f": registration Dice {dice}, mismatch {r['mismatch']:.3f}, "
                 + ("NEEDS REVIEW" if r["needs_review"] else "within thresholds"))
    return text


def parse_since(text: str) -> float:
    """``--since``: a date ``2026-11-26`` (its midnight) or a time ``2026-11-26T10:00`` (ISO 8601, local
    time unless it carries an offset), as seconds since the epoch; ``ValueError`` otherwise.
    """
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since must be a date YYYY-MM-DD or a time YYYY-MM-DDTHH:MM, got {text!r}") from None
    return when.timestamp() if when.tzinfo else when.astimezone().timestamp()


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{state} {n}" for state, n in sorted(counts.items())) or "none"


#: Width ``musclenode status`` keeps a study's or job's line to, cutting its message (``--json`` has it whole).
STATUS_WIDTH = 180

#: States ``musclenode status --state`` accepts: the studies' states, and ``skipped``.
STATUS_STATES = (*(s.value for s in StudyState), JobState.SKIPPED.value)


def _node_data(args: argparse.Namespace, parse: Callable[[str], Any] = parse_since):
    """(config, ``--since`` parsed by ``parse``, or None) for a verb that reads the node's records, or
    the exit code: 2 for a bad ``--since``, 1 when the node has no data yet (nothing received).
    """
    config = load_config(args.config)
    try:
        since = parse(args.since) if args.since else None
    except ValueError as exc:
        print(f"musclenode: {exc}", file=sys.stderr)
        return 2
    if not config.database.url and not (Path(config.node.data_dir) / "musclenode.db").exists():
        print(f"no node data in {config.node.data_dir} (nothing received yet)", file=sys.stderr)
        return 1
    return config, since


def cmd_status(args: argparse.Namespace) -> int:
    """``musclenode status``: counts per state and the most recent studies (``--state``, ``--since``,
    ``--limit``), jobs not done, pending sends and quarantine; returns 1 if the node has no data,
    2 for a bad ``--since``.
    """
    from .db import make_engine
    from .service import status_report
    opened = _node_data(args)
    if isinstance(opened, int):
        return opened
    config, since = opened
    report = status_report(make_engine(config.database_url), state=args.state, since=since, limit=args.limit)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"instances stored: {report['n_instances']}")
    print(f"studies: {report['n_studies']} ({_counts(report['study_counts'])})")
    which = "".join([f" {args.state}" if args.state else "", f" received since {args.since}" if args.since else ""])
    print(f"most recent{which} studies: {len(report['studies'])} of {report['n_studies_matching']}")
    for s in report["studies"]:
        line = (f"  {printable(s['study_uid'])}  {s['state']:<10} rev {s['revision']}  {s['n_instances']} instances  "
                f"{printable(s['study_date'], 8) or '-'}  received {_fmt_time(s['last_received_at'])}  ")
        print(line + printable(s["message"], max(STATUS_WIDTH - len(line), 40)))
        if s.get("rois"):
            print(f"      ROIs: {_rois_line(s['rois'])}")
    print(f"jobs: {_counts(report['job_counts'])}")
    for j in report["jobs"]:
        held = f"  by {printable(j['claimed_by'], 80)}" if j["state"] == JobState.RUNNING and j["claimed_by"] else ""
        line = f"  #{j['id']} {j['state']:<8} attempts {j['attempts']}{held}  study {printable(j['study_uid'])}  "
        print(line + printable(j["message"], max(STATUS_WIDTH - len(line), 40)))
    sends = report["send_counts"]
    print(f"sends: {sends.get(OutboxState.SENT, 0)} sent, {sum(sends.values()) - sends.get(OutboxState.SENT, 0)} "
          "pending")
    for s in report["sends"]:
        print(f"  {s['kind']} {printable(s['sop_uid'])} -> {printable(s['destination'])}: attempts {s['attempts']}, "
              f"next try {_fmt_time(s['next_try_at'])}, last error: {printable(s['last_error'] or '-', 100)}")
    if report["roi_sets"]:
        print(f"readers' ROI sets ({report['n_roi_sets']}, latest {len(report['roi_sets'])}):")
        for r in report["roi_sets"]:
            date = printable(r["study_date"], 8) or "no date"
            print(f"  {r['region']} of study {printable(r['study_uid'])} ({date}): "
                  f"{r['n_rois']} ROIs, SEG {printable(r['seg_sop_uid'])}")
    if report["quarantine"]:
        print(f"quarantine ({report['n_quarantine']}, latest {len(report['quarantine'])}):")
        for q in report["quarantine"]:
            print(f"  {Path(q['path']).name}: {printable(q['reason'], 100)}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """``musclenode audit``: the audit log, one line per entry, oldest first; returns 1 if the node
    has no data, 2 for a bad ``--since``.
    """
    from .db import make_engine
    from .service import audit_entries
    opened = _node_data(args)
    if isinstance(opened, int):
        return opened
    config, since = opened
    for e in audit_entries(make_engine(config.database_url), since=since, limit=args.limit):
        print(f"{_iso(e['at'])} {printable(e['event'], 32)} {printable(e['detail'], 400)}")
    return 0


def cmd_process(args: argparse.Namespace) -> int:
    """``musclenode process``: write SEG, SR and measurements.csv for each study in a folder;
    returns 1 if a study failed or no MR images were found, 2 if the input is not a folder.
    """
    from quant.errors import QuantError

    from .processing import (
        build_outputs,
        cached_atoms,
        encode,
        is_reader_seg,
        load_datasets,
        measurement_rows,
        measurements_csv,
        output_datasets,
    )
    src, out = Path(args.input), Path(args.out)
    if not src.is_dir():
        print(f"musclenode process: {src} is not a directory", file=sys.stderr)
        return 2
    paths = sorted(p for p in src.rglob("*") if p.is_file())
    datasets, rejected = load_datasets(paths)
    for r in rejected:
        print(f"skipped {r.path}: {r.reason}", file=sys.stderr)
    if not [d for d in datasets if not is_reader_seg(d)]:
        print(f"musclenode process: no MR images in {src}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    config = load_config(args.config)
    provider = cached_atoms(Path(config.node.data_dir) / "cache")
    rows, failed = [], 0
    for study_uid, dss in _group_studies(datasets).items():
        try:
            result = build_outputs(dss, t2_options=config.t2.options(), atoms=provider,
                                   compartments=args.compartments)
        except QuantError as exc:
            print(f"study {study_uid}: {exc}", file=sys.stderr)
            failed += 1
            continue
        for kind, ds in output_datasets(result):
            path = out / f"{kind}-{ds.SOPInstanceUID}.dcm"
            path.write_bytes(encode(ds))
            print(f"wrote {path}")
        for note in result.analysis.notes:
            print(f"study {study_uid}: {note}")
        for s in result.analysis.series:
            if not s.usable:
                print(f"series {s.description or s.series_instance_uid} skipped: {s.reason}")
        rows.extend(measurement_rows(result))
    (out / "measurements.csv").write_text(measurements_csv(rows))
    print(f"wrote {out / 'measurements.csv'} ({len(rows)} rows)")
    return 1 if failed else 0


def _group_studies(datasets: Iterable[Dataset]) -> dict[str, list[Dataset]]:
    out: dict[str, list[Dataset]] = {}
    for ds in datasets:
        out.setdefault(str(ds.StudyInstanceUID), []).append(ds)
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    """``musclenode demo``: push a synthetic two-visit exam through a node; returns 0 if the results came back."""
    from .demo import run_demo
    return run_demo(Path(args.workdir) if args.workdir else None, snr=args.snr)


def cmd_warmup(args: argparse.Namespace) -> int:
    """``musclenode warmup``: compile and cache the numba kernels; returns 0."""
    from .warmup import warm_up
    print(f"numba kernels compiled and cached in {warm_up():.1f} s")
    return 0


def _engine(args: argparse.Namespace):
    from .db import make_engine
    config = load_config(args.config)
    Path(config.node.data_dir).mkdir(parents=True, exist_ok=True)
    return config, make_engine(config.database_url)


def cmd_token(args: argparse.Namespace) -> int:
    """``musclenode token create|list|revoke``: bearer tokens of the web API; returns 1 on failure."""
    from .web.tokens import create_token, list_tokens, revoke_token
    _, engine = _engine(args)
    if args.action == "create":
        try:
            token = create_token(engine, args.name, args.role)
        except ValueError as exc:
            print(f"musclenode: {exc}", file=sys.stderr)
            return 1
        print(f"token {args.name!r} ({args.role}) created; it is shown only now, keep it safe:")
        print(token)
        return 0
    if args.action == "list":
        for t in list_tokens(engine):
            state = f"revoked {_fmt_time(t['revoked_at'])}" if t["revoked_at"] else "active"
            print(f"{t['name']:<24} {t['role']:<12} created {_fmt_time(t['created_at'])}  {state}")
        return 0
    if not revoke_token(engine, args.name):
        print(f"musclenode: no active token called {args.name!r}", file=sys.stderr)
        return 1
    print(f"token {args.name!r} revoked")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``musclenode export``: the pseudonymised long-format export to a file; returns 0 (2 for a bad date)."""
    from .web.app import to_csv, to_parquet
    from .web.pseudonym import site_secret
    from .web.queries import measurement_table
    config, engine = _engine(args)
    since = (args.since or "").replace("-", "")
    if since and not (len(since) == 8 and since.isdigit()):
        print(f"musclenode: --since must be a date YYYY-MM-DD, got {args.since!r}", file=sys.stderr)
        return 2
    secret = site_secret(Path(config.node.data_dir))
    t0 = time.time()
    print("export: reading the measurements ...", end="", file=sys.stderr, flush=True)
    with engine.begin() as conn:
        rows = measurement_table(conn, secret, metric=args.metric, region=args.region, since=since or None)
    print(f"\rexport: {len(rows)} rows read in {time.time() - t0:.1f} s, writing {args.format} ...", end="",
          file=sys.stderr, flush=True)
    data = to_parquet(rows) if args.format == "parquet" else to_csv(rows).encode()
    Path(args.output).write_bytes(data)
    print(f"\rexport: done in {time.time() - t0:.1f} s" + " " * 40, file=sys.stderr)
    print(f"{len(rows)} rows written to {args.output} ({args.format}, pseudonymised)")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """``musclenode history rebuild``: a patient's history from the destinations with ``query``;
    returns 0 when every one answered, 1 when one did not or none has ``query = true``.
    """
    from pydicom.dataset import Dataset

    from .history import rebuild_history
    from .instances import subject_key
    config, engine = _engine(args)
    sources = [d for d in config.destinations if d.query]
    if not sources:
        print("musclenode: no destination has query = true in the configuration", file=sys.stderr)
        return 1
    ds = Dataset()
    ds.PatientID = args.patient
    if args.issuer:
        ds.IssuerOfPatientID = args.issuer
    key = args.subject_key or subject_key(ds)
    result = rebuild_history(engine, sources, key, args.patient, args.issuer or "", calling_ae=config.node.ae_title,
                             timeout=config.send.query_timeout_seconds, context="on demand (musclenode history)",
                             tls=config.node.tls)
    for a in result.answers:
        if not a.answered:
            print(f"{a.destination}: no answer ({a.error})")
            continue
        srs, values = result.recorded_by_destination.get(a.destination, (0, 0))
        print(f"{a.destination}: {a.studies} earlier studies, {a.srs} musclenode SRs retrieved, "
              f"{srs} SRs recorded with {values} values")
    print(f"history of {key}: {result.recorded_studies} studies, {result.recorded_values} values recorded")
    return 1 if result.unanswered else 0


def cmd_db(args: argparse.Namespace) -> int:
    """``musclenode db upgrade|current``: the database's schema revision (Alembic); returns 0, or 2 when
    the database was made by a newer version (a revision this version does not know).
    """
    from . import migrations
    from .db import make_engine
    config = load_config(args.config)
    Path(config.node.data_dir).mkdir(parents=True, exist_ok=True)
    engine = make_engine(config.database_url, migrate=False)
    if args.action == "current":
        rev, target = migrations.current(engine), migrations.head()
        if rev == target:
            state = "head"
        elif rev is not None and not migrations.known(rev):
            state = f"unknown to this version, whose head is {target}: a newer version made it"
        else:
            state = f"head is {target}: musclenode db upgrade, or the node at start, upgrades"
        print(f"{rev or 'none (empty, or made before schema migrations)'} ({state})")
        return 0
    result = migrations.upgrade(engine)   # SchemaError: main() says so, exit code 2
    if result.before == result.after:
        print(f"database schema already at {result.after} (head)")
    elif result.adopted:
        print(f"database schema upgraded from {result.before} (adopted: made before schema migrations) "
              f"to {result.after}")
    else:
        print(f"database schema upgraded from {result.before or 'none (empty database)'} to {result.after}")
    return 0


def cmd_reprocess(args: argparse.Namespace) -> int:
    """``musclenode reprocess``: queue the selected studies not processed by the current algorithm
    version and process them (``--wait``: wait while a running node does), with a progress bar;
    returns 0 when all are done, 1 when one failed or the node has no data, 2 for a bad
    ``--since``, 130 when interrupted (run it again to go on).
    """
    import multiprocessing
    import os

    from .db import make_engine, record_audit
    from .jobs import JobRunner, requeue_dead_local
    from .reprocess import (
        ProgressBar,
        parse_study_date,
        progress,
        select_and_queue,
        studies_of,
        version,
        watch,
    )
    from .worker import job_context
    found = _node_data(args, parse_study_date)
    if isinstance(found, int):
        return found
    config, since = found
    engine = make_engine(config.database_url)
    current = version()
    # jobs a stopped run left running on this host (SIGKILL, say); other hosts' end with their lease
    resumed = 0 if args.wait else requeue_dead_local(engine, config.jobs.max_attempts)
    sel = select_and_queue(engine, current, subject=args.subject, since=since, send=args.send,
                           version_note=args.version_note or "")
    send = "sent to the destinations" if args.send else "not sent (--no-send)"
    with engine.begin() as conn:
        record_audit(conn, "reprocess-started",
                     f"version={current} queued={len(sel.queued)} resumed={len(sel.in_flight)} "
                     f"send={'yes' if args.send else 'no'} note={printable(args.version_note or '', 200)}")
    print(f"{current}: {studies_of(sel.queued)} queued, {studies_of(sel.in_flight)} from an earlier run"
          f"{f' ({resumed} left running)' if resumed else ''}, {sel.current} already at this version, "
          f"{sel.busy} being received or processed; results {send}", flush=True)
    if not sel.studies:
        return 0
    stop, wake = threading.Event(), threading.Event()

    def interrupted(*_):
        if stop.is_set():   # a second Ctrl-C: stop now; the jobs in progress are resumed by the next run
            for child in multiprocessing.active_children():
                child.terminate()
            os._exit(130)
        stop.set()
        wake.set()
        print("\nstopping after the studies in progress (Ctrl-C again to stop at once); run the same command "
              "again to go on", file=sys.stderr, flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupted)
    runner = None
    if args.wait:
        print("waiting for the running node (musclenode serve) to process them", flush=True)
    else:
        runner = JobRunner(engine, job_context(config), executor=config.jobs.executor, workers=config.jobs.workers,
                           lease_seconds=config.jobs.lease_seconds, max_attempts=config.jobs.max_attempts,
                           on_done=wake.set)
        runner.start()
    bar = ProgressBar(sys.stderr)
    tracked = set(sel.studies)
    try:
        p = watch(engine, tracked, bar, stop, wake=wake)
    finally:
        bar.close()
        if runner is not None:
            runner.stop()
    if stop.is_set():
        p = progress(engine, tracked)   # what the studies in progress came to
    with engine.begin() as conn:
        record_audit(conn, "reprocess-stopped" if not p.finished else "reprocess-finished",
                     f"version={current} done={p.done} of {p.total} failed={p.failed}")
    if not p.finished:
        print(f"stopped: {p.done} of {p.total} studies done; run the same command again to go on")
        return 130
    print(f"{p.done} studies reprocessed with {current}" + (f", {p.failed} failed (musclenode status)"
                                                            if p.failed else ""))
    return 1 if p.failed else 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser; each subcommand sets ``func``, the ``cmd_*`` function that runs it."""
    p = argparse.ArgumentParser(prog="musclenode", description="DICOM node for quantitative muscle MRI.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the DICOM node (receive, quantify, send)")
    s.add_argument("--config", "-c", help="TOML configuration file (default: built-in defaults)")
    s.add_argument("--role", choices=ROLES,
                   help="what this process runs: receiver (DICOM SCP and study completion), worker (jobs and "
                        "sends, no DICOM port) or all (everything, a single node); overrides [node] role")
    s.set_defaults(func=cmd_serve)
    s = sub.add_parser("status", help="summarise the node: studies per state, the most recent studies, jobs not "
                                      "done, pending sends and quarantine")
    s.add_argument("--config", "-c", help="TOML configuration file (to find the data directory)")
    s.add_argument("--state", choices=STATUS_STATES, help="list only studies in this state (skipped: processed, "
                                                          "nothing to quantify)")
    s.add_argument("--since", help="list only studies received at or after this date or time "
                                   "(2026-11-26 or 2026-11-26T10:00, local time)")
    s.add_argument("--limit", type=_positive_int, default=20,
                   help="list at most this many studies, jobs, sends and quarantined files (default 20)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)
    s = sub.add_parser("audit", help="print the audit log: who sent which study when, what was made, where it went")
    s.add_argument("--config", "-c", help="TOML configuration file (to find the database)")
    s.add_argument("--since", help="only entries at or after this date or time (2026-11-26 or 2026-11-26T10:00, "
                                   "local time)")
    s.add_argument("--limit", type=_positive_int, help="only the N most recent entries (still printed oldest first)")
    s.set_defaults(func=cmd_audit)
    s = sub.add_parser("process", help="run the pipeline offline on a folder of DICOM files")
    s.add_argument("input", help="folder with the DICOM files of one or more studies (searched recursively)")
    s.add_argument("--out", "-o", required=True, help="folder for the SEG, SR and measurements.csv")
    s.add_argument("--config", "-c", help="TOML configuration ([t2] settings; the EPG dictionary cache "
                                          "is kept under node.data_dir)")
    s.add_argument("--compartments", action="store_true",
                   help="also measure the automatic compartments of a thigh or calf (rows with roi and "
                        "source 'automatic' in measurements.csv)")
    s.set_defaults(func=cmd_process)
    s = sub.add_parser("demo", help="push a synthetic two-visit exam through a node and show the results")
    s.add_argument("--workdir", help="keep the demo's files here (default: a new temporary folder)")
    s.add_argument("--snr", type=float, default=40.0, help="signal-to-noise ratio of the phantom (default 40)")
    s.set_defaults(func=cmd_demo)
    s = sub.add_parser("warmup", help="compile and cache the numba kernels (done at install; "
                                      "the node also does it before it accepts associations)")
    s.set_defaults(func=cmd_warmup)
    s = sub.add_parser("token", help="bearer tokens of the web API (create, list, revoke)")
    tok = s.add_subparsers(dest="action", required=True)
    t = tok.add_parser("create", help="create a token; it is printed once, as the last line")
    t.add_argument("name")
    t.add_argument("--role", required=True, choices=("coordinator", "admin"))
    t.add_argument("--config", "-c", help="TOML configuration file")
    t = tok.add_parser("list", help="list tokens (names and roles, never the tokens)")
    t.add_argument("--config", "-c", help="TOML configuration file")
    t = tok.add_parser("revoke", help="revoke a token")
    t.add_argument("name")
    t.add_argument("--config", "-c", help="TOML configuration file")
    s.set_defaults(func=cmd_token)
    s = sub.add_parser("export", help="write the pseudonymised long-format measurements to a file")
    s.add_argument("output", help="file to write")
    s.add_argument("--format", choices=("csv", "parquet"), default="csv")
    s.add_argument("--metric", help="only this metric (e.g. frma_mm2)")
    s.add_argument("--region", help="only this region (thigh, calf, hand, head_neck)")
    s.add_argument("--since", help="only visits on or after this date (YYYY-MM-DD)")
    s.add_argument("--config", "-c", help="TOML configuration file")
    s.set_defaults(func=cmd_export)
    s = sub.add_parser("history", help="a subject's earlier values from the SRs in PACS (destinations with "
                                       "query = true)")
    hist = s.add_subparsers(dest="action", required=True)
    h = hist.add_parser("rebuild", help="C-FIND and C-GET the patient's musclenode SRs from every destination with "
                                        "query = true and record their values as the subject's history")
    h.add_argument("--patient", required=True, help="Patient ID to query")
    h.add_argument("--issuer", help="Issuer of Patient ID (default: none)")
    h.add_argument("--subject-key", help="the node's subject key to file the values under (default "
                                         "patient:<issuer>:<patient>; give trial:<sponsor>:<subject> for a trial "
                                         "subject)")
    h.add_argument("--config", "-c", help="TOML configuration file (destinations, node AE title, database)")
    s.set_defaults(func=cmd_history)
    s = sub.add_parser("db", help="the database's schema (Alembic migrations; the node also applies them at start)")
    dbs = s.add_subparsers(dest="action", required=True)
    d = dbs.add_parser("upgrade", help="upgrade the schema to this version's newest revision and print from which "
                                       "revision to which")
    d.add_argument("--config", "-c", help="TOML configuration file (to find the database)")
    d = dbs.add_parser("current", help="print the database's schema revision and whether it is this version's newest")
    d.add_argument("--config", "-c", help="TOML configuration file (to find the database)")
    s.set_defaults(func=cmd_db)
    s = sub.add_parser("reprocess", help="measure the selected studies again with the current algorithm version "
                                         "(new SRs supersede the old ones), with a progress bar; run it again "
                                         "after an interruption to go on")
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every study")
    which.add_argument("--subject", metavar="S",
                       help="one subject's studies: its subject key (trial:<sponsor>:<subject> or "
                            "patient:<issuer>:<patient>), Clinical Trial Subject ID or Patient ID")
    which.add_argument("--since", metavar="DATE",
                       help="studies with a study date on or after this date (YYYY-MM-DD or YYYYMMDD)")
    s.add_argument("--version-note", metavar="TEXT",
                   help="why the trial is reprocessed (kept with each job and in the audit log)")
    s.add_argument("--send", action=argparse.BooleanOptionalAction, default=False,
                   help="send the new results to the destinations as well (default --no-send: stored and "
                        "recorded only)")
    s.add_argument("--wait", action="store_true", help="do not process here: wait while the running node "
                                                       "(musclenode serve) processes the queued studies")
    s.add_argument("--config", "-c", help="TOML configuration file (database, [jobs] workers, destinations)")
    s.set_defaults(func=cmd_reprocess)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command in ``argv`` (default: ``sys.argv``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose if args.command != "demo" else args.verbose - 1)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"musclenode: configuration error: {exc}", file=sys.stderr)
        return 2
    except SchemaError as exc:   # the database was made by a newer version
        print(f"musclenode: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
