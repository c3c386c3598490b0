"""Errors the training side raises; Horovod's names are kept because user code catches them."""

from __future__ import annotations

from rendezvous.errors import HordeError


class HorovodInternalError(HordeError, RuntimeError):
    """A collective failed or its generation ended (a peer died, hung or left).

    Under `hvd.elastic.run` this rolls the state back to the last commit and rebuilds
    the process group on the next generation.
    """


class HostsUpdatedInterrupt(HordeError, RuntimeError):
    """New members were admitted; raised at `state.commit()` / `check_host_updates()`.

    `skip_sync` is True when the update only removed members, so the survivors'
    state is already consistent and need not be broadcast again.
    """

    def __init__(self, skip_sync: bool = False) -> None:
        super().__init__("the set of hosts changed; resetting on the next generation")
        self.skip_sync = skip_sync


class CollectiveMismatchError(HordeError, RuntimeError):
    """Ranks called a collective with disagreeing arguments (shape, dtype, op, root).

    A `RuntimeError`, as in Horovod, but not a `HorovodInternalError`: it is a bug in
    the script, so `hvd.elastic.run` does not retry it forever.
    """


class CollectiveStallError(HordeError, RuntimeError):
    """A collective waited longer than the stall-shutdown time for ranks that never submitted
    it (`HOROVOD_STALL_SHUTDOWN_TIME_SECONDS`); the message names them and what they do.

    Not a `HorovodInternalError`: ranks running different collectives is a bug in the
    script (or a rank hung outside collectives), so `hvd.elastic.run` does not retry it.
    The rank's collectives stay shut down afterwards, as Horovod's do after a stall.
    """


class NotInitializedError(HordeError, ValueError):
    """A Horde call was made before `hvd.init()`."""

    def __init__(self, what: str = "Horde") -> None:
        super().__init__(f"{what} has not been initialized; run hvd.init() first.")


class ResetLimitExceededError(HordeError, RuntimeError):
    """The job reset more often than `--reset-limit` allows."""


class GenerationUnreachableError(HorovodInternalError):
    """This node is a member of a published generation but could not connect its process
    group: the message names the store or the peers that could not be reached, from
    which node and address, in which generation.

    In a job that is not elastic `hvd.init()` raises it at once. In an elastic job the
    node reports the failure and waits for the next generation; it is raised (with the
    wait's own error as its cause) only if no later generation admits the node.
    """


class ObjectNotAllowedError(HordeError, TypeError):
    """An object sent to or received from peers is not plain data (a custom class, a
    lambda, a pickle with a `__reduce__`), and this worker does not trust its peers.

    The message names the type or global and the opt-in (`horderun --trusted-peers`).
    Not a `HorovodInternalError`: retrying would send the same object again, so
    `hvd.elastic.run` does not retry it. Nothing in a refused object ran.
    """


class ObjectTooLargeError(HordeError, ValueError):
    """A peer announced a serialized object larger than `HORDE_MAX_OBJECT_BYTES`; it was
    refused before anything was allocated. Every rank of the collective raises it (they
    all saw the same sizes); not a `HorovodInternalError`, so it is not retried.
    """


class AllgatherSizeError(HordeError, ValueError):
    """A rank announced a part of a tensor allgather or alltoall that is negative or
    larger than `HORDE_MAX_ALLGATHER_BYTES`; it was refused before the result was
    allocated. Every rank of the collective raises it (they all saw the same sizes, so
    the collectives still line up); not a `HorovodInternalError`, so it is not retried.
    `ranks`: the offenders, as ranks of the collective's process set.
    """

    def __init__(self, message: str, ranks: list[int] | tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.ranks = tuple(ranks)


class NonFiniteGradientError(HordeError, RuntimeError):
    """The aggregated gradient was non-finite (NaN/Inf) in too many consecutive steps or
    rounds (`HORDE_MAX_NONFINITE_STEPS`): the model or the data went bad on every member.

    Raised on every member at the same step (they all see the same aggregate). Not a
    `HorovodInternalError`: a reset would restore the same state and fail again, so
    `hvd.elastic.run` does not retry it and the job ends with a non-zero exit.
    """
