"""``[jobs] executor = "dask"``: the node's jobs run as tasks on a Dask distributed cluster.

The job runner (:class:`node.jobs.JobRunner`) claims job rows exactly as it does with local
processes and hands :func:`node.worker.execute_job` to :class:`DaskJobExecutor`, a
:class:`concurrent.futures.Executor` over a :class:`distributed.Client`: the runner's code does
not change, and neither does the job's. What the cluster must share with the node:

- the storage root (``[node] data_dir``) at the same path on every worker (a shared file
  system): the received instances, the results, and ``<data_dir>/cache``, where the EPG
  dictionaries are built once and then loaded by every worker;
- the database (``[database] url``): PostgreSQL for workers on other machines;
- the same musclenode installation (``node`` and ``quant`` importable by the workers).

A worker lost in the middle of a task (its process killed, its machine gone) is noticed by the
scheduler, which runs the task again on another worker, up to
``distributed.scheduler.allowed-failures`` times (3 by default; the scheduler's setting). The
job row stays ``running`` with its lease meanwhile, and the job records its results in one
transaction that replaces the study's measurements and series and inserts each output once
(their SOP Instance UIDs are derived from the study), so a task that ran twice records the
study once. A task given up by Dask (``KilledWorker``) or one that raised is a crash of the job's
attempt, counted against ``[jobs] max_attempts`` like a lost local worker.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading
import uuid
from collections.abc import Callable
from typing import Any

from . import CHATTY_LOGGERS
from .config import ConfigError
from .text import install_safe_formatter
from .warmup import warm_up

log = logging.getLogger(__name__)

#: Seconds the node waits for the scheduler to answer at start before it gives up.
CONNECT_TIMEOUT = 20.0
#: Seconds :meth:`DaskJobExecutor.shutdown` waits for the jobs in flight before it cancels them.
SHUTDOWN_WAIT = 120.0


class SchedulerUnreachable(ConfigError):
    """No Dask scheduler answered at ``[jobs] scheduler_address``."""


def prepare_worker(level: int, cache_dir: str) -> tuple[int, float]:
    """Run once on each Dask worker before its first job: the node's log level and format for
    what jobs log (a Dask worker only sets up the ``distributed`` logger), then the warm-up
    (:func:`node.warmup.warm_up`) with the EPG tables of the shared ``cache_dir``.

    Returns
    -------
    tuple of (int, float)
        The worker's process id and the warm-up's seconds.
    """
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level,
                            format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    for name in ("node", "quant", "reports"):
        logging.getLogger(name).setLevel(level)
    install_safe_formatter()
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    return os.getpid(), warm_up(cache_dir)


def run_single_threaded(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` with numba's parallel kernels on one thread (the calling thread's setting).

    A Dask worker thread is one job, and a cluster runs one such thread per core
    (``--nthreads 1 --nworkers <cores>``): a job whose kernels also started a thread per core
    would oversubscribe the machine, and OpenMP threads spin while they wait. Measured with
    ``bench/scale.py`` on 2 cores: 2 workers used 7.8 CPU s per study instead of 3.1, and made
    0.48x the studies per minute of one worker instead of 1.8x.
    """
    try:
        import numba
        numba.set_num_threads(1)
    except (ImportError, ValueError):   # pragma: no cover - numba is a dependency
        pass
    return fn(*args, **kwargs)


def _task_key(fn: Callable, args: tuple) -> str:
    """A readable, unique task key: ``musclenode-execute_job-12-1f3a9c0e`` (the job's id, then a
    token: each submission of a job is a task of its own).
    """
    ids = "-".join(str(a) for a in args if isinstance(a, int) and not isinstance(a, bool))
    name = getattr(fn, "__name__", "task")
    return f"musclenode-{name}{'-' + ids if ids else ''}-{uuid.uuid4().hex[:8]}"


class DaskJobExecutor(cf.Executor):
    """A :class:`concurrent.futures.Executor` whose tasks run on a Dask cluster.

    Parameters
    ----------
    address : str
        The scheduler, ``tcp://host:8786`` (``[jobs] scheduler_address``).
    connect_timeout : float
        Seconds to wait for the scheduler (default :data:`CONNECT_TIMEOUT`); then
        :class:`SchedulerUnreachable`.

    Notes
    -----
    :meth:`submit` returns a :class:`concurrent.futures.Future` that completes with the Dask
    task: its result, its exception (``distributed.KilledWorker`` when the scheduler gave up on
    the task after its workers died), or :class:`concurrent.futures.CancelledError`.
    """

    def __init__(self, address: str, *, connect_timeout: float | None = None):
        from distributed import Client
        self.address = address
        connect_timeout = CONNECT_TIMEOUT if connect_timeout is None else connect_timeout
        try:
            self.client = Client(address, timeout=connect_timeout, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise SchedulerUnreachable(
                "jobs.scheduler_address",
                f"no Dask scheduler answered at {address} within {connect_timeout:g} s "
                f"(is `dask scheduler` running there and reachable?): {type(exc).__name__}: {exc}") from None
        self._lock = threading.Lock()
        self._in_flight: dict[Any, cf.Future] = {}   # distributed future -> the runner's future
        self._closed = False

    def worker_threads(self) -> dict[str, int]:
        """The cluster's workers now: address -> threads."""
        return dict(self.client.nthreads())

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> cf.Future:
        """Run ``fn(*args, **kwargs)`` as a task of the cluster (never a cached result: ``pure=False``),
        with numba's kernels on one thread (:func:`run_single_threaded`).
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit to a Dask executor that was shut down")
            dfut = self.client.submit(run_single_threaded, fn, *args, key=_task_key(fn, args), pure=False, **kwargs)
            cfut: cf.Future = cf.Future()
            cfut.set_running_or_notify_cancel()
            self._in_flight[dfut] = cfut
        dfut.add_done_callback(self._cascade)
        return cfut

    def _cascade(self, dfut) -> None:
        """The Dask task ended: complete the runner's future the same way (in Dask's callback thread)."""
        with self._lock:
            cfut = self._in_flight.pop(dfut, None)
        if cfut is None or cfut.done():
            return
        try:
            if dfut.status == "finished":
                cfut.set_result(dfut.result())
            elif dfut.status == "cancelled":
                cfut.set_exception(cf.CancelledError(f"Dask task {dfut.key} was cancelled"))
            else:
                cfut.set_exception(dfut.exception())
        except BaseException as exc:  # noqa: BLE001 - the result could not be fetched (worker gone, client closed)
            if not cfut.done():
                cfut.set_exception(exc)
        finally:
            dfut.release()

    def warm_up(self, cache_dir: str, timeout: float) -> dict[str, tuple[int, float]]:
        """Run :func:`prepare_worker` once on every worker connected now, in its task thread (not its
        event loop, which keeps answering the scheduler); returns address -> (pid, seconds) of
        those done within ``timeout``. A worker that joins later loads the kernels on its first
        job (from the numba cache of the installation and the EPG tables of ``cache_dir``).
        """
        from distributed import wait
        workers = list(self.worker_threads())
        if not workers:
            log.warning("no Dask worker is connected to %s yet: jobs wait for one", self.address)
            return {}
        level = logging.getLogger().getEffectiveLevel()
        futs = {w: self.client.submit(prepare_worker, level, cache_dir, workers=[w], allow_other_workers=False,
                                      key=f"musclenode-warm-up-{uuid.uuid4().hex[:8]}", pure=False) for w in workers}
        try:
            with self.client.as_current():
                wait(list(futs.values()), timeout=timeout)
        except TimeoutError:
            log.warning("warm-up of the Dask workers still running after %.0f s; jobs start anyway", timeout)
        out = {w: f.result() for w, f in futs.items() if f.status == "finished"}
        for f in futs.values():
            f.release()
        return out

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Close the connection to the cluster. With ``wait``, the jobs in flight finish first (for
        at most :data:`SHUTDOWN_WAIT` seconds); those still running then are cancelled: their
        job rows stay ``running`` and run again after their lease (or at the next start).
        """
        from distributed import wait as dask_wait
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._in_flight)
        if pending and wait:
            try:
                with self.client.as_current():
                    dask_wait(pending, timeout=SHUTDOWN_WAIT)
            except TimeoutError:
                log.warning("%d Dask job(s) still running after %.0f s; cancelled", len(pending), SHUTDOWN_WAIT)
        if pending and (cancel_futures or not wait):
            self.client.cancel([f for f in pending if not f.done()])
        self.client.close()


def start_dask_executor(address: str, cache_dir: str, *, warm_up_timeout: float,
                        connect_timeout: float | None = None) -> DaskJobExecutor:
    """Connect to the scheduler at ``address`` and warm up its workers; the executor the job
    runner submits jobs to. Raises :class:`SchedulerUnreachable` (a :class:`ConfigError` naming
    ``jobs.scheduler_address``) when no scheduler answers within ``connect_timeout`` seconds
    (:data:`CONNECT_TIMEOUT` by default).
    """
    executor = DaskJobExecutor(address, connect_timeout=connect_timeout)
    ready = executor.warm_up(cache_dir, warm_up_timeout)
    log.info("Dask scheduler %s: %d worker(s) ready (warm-up %s s)", address, len(ready),
             ", ".join(f"{s:.1f}" for _, s in ready.values()))
    return executor
