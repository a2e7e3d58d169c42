"""Exceptions of :mod:`node`."""


class NodeError(Exception):
    """Base class of errors raised by the node."""


class InstanceRejected(NodeError):
    """An incoming instance cannot be accepted; the message says why (it is quarantined)."""


class SchemaError(NodeError):
    """The database's schema cannot be brought to the one this version needs (a revision newer
    than this version knows, or an earlier version's table that lacks a column without a default).
    """
