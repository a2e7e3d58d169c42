"""Exceptions of :mod:`node`."""


class NodeError(Exception):
    """Base class of errors raised by the node."""


class InstanceRejected(NodeError):
    """An incoming instance cannot be accepted; the message says why (it is quarantined)."""
