"""Who holds a claim on a job or a send: ``"host:pid"`` of a node process (``jobs.claimed_by``,
``outbox.claimed_by``), and which holders on this host are gone, so that a node restarting on
a shared database frees what its dead predecessor held without waiting for the lease.
"""

from __future__ import annotations

import os
import socket


def node_id() -> str:
    """``"host:pid"`` of this process: what ``jobs.claimed_by`` and ``outbox.claimed_by`` name."""
    return f"{socket.gethostname()}:{os.getpid()}"


def dead_local_holders(holders: set[str], *, fresh_start: bool = True) -> set[str]:
    """Of the ``"host:pid"`` claim holders given, those on this host whose process is gone:
    its pid no longer runs, or it is this very process's pid (with ``fresh_start``: this
    process has claimed nothing yet, so a claim in its name was made by an earlier process
    that had the same pid, as in a container restarted with pid 1). Holders on other hosts
    are never in it: their claims end with their lease.
    """
    host = socket.gethostname()
    dead = set()
    for holder in holders:
        name, _, pid_text = holder.rpartition(":")
        if name != host or not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if pid == os.getpid():
            if fresh_start:
                dead.add(holder)
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            dead.add(holder)
        except PermissionError:   # alive, another user's
            pass
    return dead
