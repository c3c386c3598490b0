"""Framework-neutral elastic state and the `run` retry loop (Horovod's `hvd.elastic`).

`State.commit()` saves a copy that a failed collective rolls back to, then checks
whether new members are waiting. The `run` wrapper re-enters the training function
after every reset: it restores and re-synchronizes state, rebuilding the process
group in place instead of restarting processes.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from typing import Any

from elastic.errors import HorovodInternalError, HostsUpdatedInterrupt, ResetLimitExceededError

logger = logging.getLogger(__name__)


class State:
    """Training state that can be committed, restored and synchronized across ranks.

    Subclasses implement `save`, `restore` and `sync`; `reset` is an optional hook
    run after the membership changed.
    """

    def __init__(self, bcast_object: Callable[[Any], Any], get_rank: Callable[[], int],
                 check_host_updates: Callable[[], bool]) -> None:
        self._bcast_object = bcast_object
        self._rank = get_rank
        self._check_updates = check_host_updates
        self._reset_callbacks: list[Callable[[], None]] = []

    def register_reset_callbacks(self, callbacks: list[Callable[[], None]]) -> None:
        """Functions called (in order) after every reset, e.g. to rescale the learning rate."""
        self._reset_callbacks.extend(callbacks)

    def on_reset(self) -> None:
        self.reset()
        for callback in self._reset_callbacks:
            callback()

    def commit(self) -> None:
        """Save the state as the rollback point, then check for new members."""
        self.save()
        self.check_host_updates()

    def check_host_updates(self) -> None:
        """Raise HostsUpdatedInterrupt on every rank at once if members were added."""
        if self._check_updates():
            raise HostsUpdatedInterrupt(skip_sync=False)

    def save(self) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Hook for subclasses; nothing to do by default."""


class ObjectState(State):
    """State made of plain Python attributes, synchronized by pickling from rank 0."""

    def __init__(self, bcast_object: Callable[[Any], Any], get_rank: Callable[[], int],
                 check_host_updates: Callable[[], bool], **kwargs: Any) -> None:
        self._saved_state = kwargs
        self._set_attrs()
        super().__init__(bcast_object, get_rank, check_host_updates)

    def save(self) -> None:
        self._saved_state = {k: copy.deepcopy(getattr(self, k)) for k in self._saved_state}

    def restore(self) -> None:
        self._set_attrs()

    def sync(self) -> None:
        if self._saved_state:
            self._saved_state = self._bcast_object(self._saved_state)
            self._set_attrs()

    def _set_attrs(self) -> None:
        for attr, value in self._saved_state.items():
            setattr(self, attr, copy.deepcopy(value))


def run_fn(func: Callable[..., Any], reset: Callable[[bool], None],
           reset_limit: Callable[[], int | None]) -> Callable[..., Any]:
    """Wrap `func(state, ...)` so that it survives membership changes.

    A HorovodInternalError restores the last commit; a HostsUpdatedInterrupt keeps
    the state. Either way the group is rebuilt (`reset(failed)`) and `func` re-entered
    after `state.sync()`, until it returns or the reset limit is exceeded.
    """

    @functools.wraps(func)
    def wrapper(state: State, *args: Any, **kwargs: Any) -> Any:
        skip_sync = False
        resets = 0
        while True:
            try:
                if not skip_sync:
                    state.sync()
                return func(state, *args, **kwargs)
            except HorovodInternalError as exc:
                logger.warning("collective failed (%s); restoring the last commit", exc)
                state.restore()
                skip_sync = False
                failed = True
            except HostsUpdatedInterrupt as exc:
                logger.info("new members admitted; resetting")
                skip_sync = exc.skip_sync
                failed = False
            resets += 1
            limit = reset_limit()
            if limit is not None and resets > limit:
                raise ResetLimitExceededError(
                    f"the job reset {resets} times, more than --reset-limit={limit}; "
                    "stopping. Raise the limit or find why members keep failing.")
            reset(failed)
            state.on_reset()

    return wrapper
