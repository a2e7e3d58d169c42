"""Text that came from outside (DICOM descriptions, names, IDs, AE titles, error messages
quoting them), made safe to print or log: control characters made visible and the length cut.

A Series Description may hold 10,000 characters, a newline that forges a log line, or an ANSI
escape that rewrites the operator's terminal. Everything the node prints or logs from such a
source goes through :func:`printable`; the log formatter of the node (:class:`SafeFormatter`)
escapes every message once more as a last line of defence.
"""

from __future__ import annotations

import logging

#: Default length of one printed value of DICOM text (LO is 64 characters, ST 1024).
DEFAULT_LIMIT = 64
ELLIPSIS = "…"

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\e"}


def _visible(ch: str) -> str:
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0 or code in (0x2028, 0x2029):
        return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"
    return ch


def printable(value: object, limit: int | None = DEFAULT_LIMIT) -> str:
    r"""``value`` as one line of visible text, at most ``limit`` characters (``None``: no cut).

    Control characters (C0, DEL, C1, line and paragraph separators) are written as escapes
    (``\n``, ``\e`` for ESC, ``\x07``), so a newline or an ANSI escape sequence cannot forge a
    log line or rewrite a terminal; text longer than ``limit`` is cut and ends with "…".

    Examples
    --------
    >>> printable("THIGH\x1b[31mRED\nfake line")
    'THIGH\\e[31mRED\\nfake line'
    >>> printable("x" * 100, limit=10)
    'xxxxxxxxx…'
    """
    text = "".join(_visible(ch) for ch in str(value))
    if limit is not None and len(text) > limit:
        return text[: max(limit - 1, 0)] + ELLIPSIS
    return text


class SafeFormatter(logging.Formatter):
    """A log formatter whose message part is :func:`printable` (cut at ``limit`` characters);
    tracebacks keep their lines.
    """

    def __init__(self, fmt: str | None = None, datefmt: str | None = None, *, limit: int = 2000):
        super().__init__(fmt, datefmt)
        self.limit = limit

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The formatted record, its message made printable."""
        record.message = printable(record.message, self.limit)
        return super().formatMessage(record)


def install_safe_formatter(limit: int = 2000) -> None:
    """Give every handler of the root logger a :class:`SafeFormatter` with the same format."""
    for handler in logging.getLogger().handlers:
        fmt = handler.formatter
        handler.setFormatter(SafeFormatter(fmt._fmt if fmt else None, fmt.datefmt if fmt else None,
                                           limit=limit))
