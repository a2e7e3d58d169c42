"""DICOM TLS (PS3.15 B.1, the BCP 195 profiles): the :class:`ssl.SSLContext` of the node's TLS port
and of its associations with destinations marked ``tls = true``.

Both sides use TLS 1.2 or later and the files of ``[node.tls]``. The server presents
``certificate`` and, with ``require_client_certificate``, refuses a peer whose certificate
does not chain to ``ca_certificates`` (without it, a certificate is verified if one is sent).
As a client the node presents the same certificate and verifies the destination's
certificate against the same CA and its name against the destination's ``tls_server_name``
(default: its ``host``, a DNS name or an IP address matched against subjectAltName).

A file that is missing or does not load raises :class:`~node.config.ConfigError` naming the
key (``node.tls.private_key``), so ``musclenode serve`` stops at start with one line.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from pynetdicom import AE

from reports.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

from .config import ConfigError, Destination, TLSSettings

__all__ = ["client_context", "scu_ae", "server_context", "tls_args"]


def _new_context(protocol: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _check_file(key: str, path: Path) -> None:
    if not path.is_file():
        raise ConfigError(key, f"{path}: no such file" if not path.exists() else f"{path}: not a file")


def _load_certificates(key: str, path: Path, ctx: ssl.SSLContext) -> None:
    try:
        ctx.load_verify_locations(cafile=str(path))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(key, f"{path}: not PEM certificates ({exc})") from None


def _load(ctx: ssl.SSLContext, tls: TLSSettings) -> None:
    """Load the node's certificate and key and the CA certificates into ``ctx``, naming the key at fault."""
    _check_file("node.tls.certificate", tls.certificate)
    _check_file("node.tls.private_key", tls.private_key)
    _check_file("node.tls.ca_certificates", tls.ca_certificates)
    # The certificates alone first, so that an error names the file at fault.
    _load_certificates("node.tls.ca_certificates", tls.ca_certificates, ctx)
    _load_certificates("node.tls.certificate", tls.certificate, ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    try:
        ctx.load_cert_chain(str(tls.certificate), str(tls.private_key), password=_no_password)
    except ssl.SSLError as exc:   # a key that does not parse, or is not the certificate's ("key values mismatch")
        raise ConfigError("node.tls.private_key", f"{tls.private_key}: not a PEM private key, or not the key "
                                                  f"of {tls.certificate} ({exc})") from None
    except _EncryptedKey:
        raise ConfigError("node.tls.private_key", f"{tls.private_key} is encrypted; the node needs it "
                                                  "without a pass phrase (readable by its user only)") from None


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    raise _EncryptedKey()


def server_context(tls: TLSSettings) -> ssl.SSLContext:
    """The context of the node's TLS port: TLS 1.2+, the node's certificate, and peers verified
    against ``ca_certificates`` (required with ``require_client_certificate``, else optional).
    """
    ctx = _new_context(ssl.PROTOCOL_TLS_SERVER)
    _load(ctx, tls)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return ctx


def client_context(tls: TLSSettings) -> ssl.SSLContext:
    """The context of an association with a TLS destination: TLS 1.2+, the node's certificate as
    client certificate, the peer's certificate verified against ``ca_certificates`` and its name checked.
    """
    ctx = _new_context(ssl.PROTOCOL_TLS_CLIENT)   # CERT_REQUIRED and check_hostname by default
    _load(ctx, tls)
    return ctx


def tls_args(dest: Destination, tls: TLSSettings | None,
             context: ssl.SSLContext | None = None) -> tuple[ssl.SSLContext, str] | None:
    """The ``tls_args`` of pynetdicom for associating with ``dest``: ``(context, server name)``, or
    None when ``dest`` is not marked ``tls``. ``context`` is a :func:`client_context` made
    earlier (one is made from ``tls`` otherwise).
    """
    if not dest.tls:
        return None
    if context is None:
        if tls is None:
            raise ConfigError("destinations.tls", f"{dest.name}: tls = true needs a [node.tls] table")
        context = client_context(tls)
    return context, dest.tls_server_name or dest.host


def scu_ae(calling_ae: str, timeout: float) -> AE:
    """The node's application entity for an association it starts (sending, history queries):
    ``calling_ae``, the node's Implementation Class UID and Version Name, and ``timeout`` for
    the connection, ACSE, DIMSE and network. Contexts are the caller's to add.
    """
    ae = AE(ae_title=calling_ae)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    return ae
