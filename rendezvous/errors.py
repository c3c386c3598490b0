"""Error hierarchy shared by every part of Horde.

`HordeError` is the root; membership errors live here because every other part
(training side, coordinator) depends on the rendezvous layer, never the reverse.
"""

from __future__ import annotations


class HordeError(Exception):
    """Root of every error Horde raises on purpose."""


class RendezvousError(HordeError):
    """The membership layer could not do what was asked."""


class RendezvousConnectionError(RendezvousError):
    """The rendezvous store (etcd) cannot be reached or answered with an error."""


class RendezvousTimeoutError(RendezvousError, TimeoutError):
    """A membership wait ran past its deadline (start or elastic timeout)."""


class RendezvousClosedError(RendezvousError):
    """The job was closed (finished or failed) while a node was waiting on it."""


class BlacklistedError(RendezvousError):
    """This node is blacklisted and may not join before its cooldown ends."""


class RendezvousPermissionError(RendezvousError):
    """etcd refused a request this node's credentials do not allow (auth on, role too narrow),
    or the credentials themselves were refused (wrong password, user deleted)."""


class RendezvousTLSError(RendezvousError):
    """TLS to etcd failed in a way retrying cannot fix: the server's certificate does not
    verify, the client certificate was refused, or one side does not speak TLS."""
