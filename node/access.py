"""Who may associate with the node: the calling AE title, the host it calls from, and the
called AE title (``[node] allowed_calling_aes`` and ``require_called_ae_title``).

The decision is made when the A-ASSOCIATE-RQ arrives (pynetdicom's ``EVT_REQUESTED``), before
any presentation context is negotiated. A refused association gets an A-ASSOCIATE-RJ with
result *rejected-permanent*, source *DICOM UL service-user* and the reason of PS3.8
§9.3.4 Table 9-21: 3 *calling-AE-title-not-recognized* (an AE title not listed, or one that
calls from a host not allowed for it) or 7 *called-AE-title-not-recognized*.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass

from .config import AllowedCaller

log = logging.getLogger(__name__)

REJECTED_PERMANENT = 0x01
SERVICE_USER = 0x01
CALLING_AE_NOT_RECOGNISED = 0x03
CALLED_AE_NOT_RECOGNISED = 0x07


@dataclass(frozen=True)
class Refusal:
    """Why an association is refused: the A-ASSOCIATE-RJ reason (3 or 7) and the words for the log."""

    reason: int
    why: str


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def host_addresses(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The IP addresses ``host`` (an address or a host name) stands for; empty if it cannot be resolved."""
    ip = _ip(host)
    if ip is not None:
        return {ip}
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError) as exc:
        log.warning("allowed_calling_aes: host %r cannot be resolved (%s); it matches no peer", host, exc)
        return set()
    found = {_ip(str(info[4][0])) for info in infos}
    return {a for a in found if a is not None}


@dataclass(frozen=True)
class AccessPolicy:
    """The association policy of the node's SCP.

    ``allowed`` empty means any calling AE from any host; ``require_called`` checks that the
    Called AE Title is ``ae_title``.
    """

    ae_title: str
    allowed: tuple[AllowedCaller, ...] = ()
    require_called: bool = True

    def check(self, calling_ae: str, called_ae: str, address: str) -> Refusal | None:
        """``None`` if an association from ``calling_ae`` at ``address`` to ``called_ae`` is
        allowed, else the :class:`Refusal` (the called AE title is checked first).
        """
        calling, called = calling_ae.strip(), called_ae.strip()
        if self.require_called and called != self.ae_title.strip():
            return Refusal(CALLED_AE_NOT_RECOGNISED, f"called AE title {called!r} is not {self.ae_title!r}")
        if not self.allowed:
            return None
        entries = [a for a in self.allowed if a.ae == calling]
        if not entries:
            return Refusal(CALLING_AE_NOT_RECOGNISED, f"calling AE title {calling!r} is not in allowed_calling_aes")
        if any(not a.host for a in entries):
            return None
        peer = _ip(address)
        if peer is not None and any(peer in host_addresses(a.host) for a in entries):
            return None
        hosts = ", ".join(a.host for a in entries)
        return Refusal(CALLING_AE_NOT_RECOGNISED, f"calling AE title {calling!r} is allowed only from {hosts}")

