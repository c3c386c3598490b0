"""HORDE_MAX_OBJECT_BYTES: read in one place (elastic/settings.py), validated, and applied
to the sizes peers announce (elastic/serialization.check_sizes). The real path, with a
hostile member announcing 2^40 bytes, is test_peer_objects.py."""

from __future__ import annotations

import pytest

from elastic import serialization
from elastic.errors import ObjectTooLargeError
from elastic.settings import WorkerSettings


def test_the_cap_defaults_to_one_gib_and_is_read_from_the_environment() -> None:
    assert WorkerSettings.from_env({}).max_object_bytes == 1 << 30
    assert WorkerSettings.from_env({"HORDE_MAX_OBJECT_BYTES": "4096"}).max_object_bytes == 4096


def test_a_cap_that_is_not_positive_is_refused_with_the_setting_named() -> None:
    with pytest.raises(ValueError, match="HORDE_MAX_OBJECT_BYTES=0 must be > 0"):
        WorkerSettings.from_env({"HORDE_MAX_OBJECT_BYTES": "0"})


def test_sizes_over_the_cap_are_refused_naming_the_ranks_and_the_setting() -> None:
    serialization.check_sizes("allgather_object", [10, 4096, 0], 4096)  # at the cap: fine
    with pytest.raises(ObjectTooLargeError) as info:
        serialization.check_sizes("allgather_object", [10, 4097, 2 ** 40], 4096)
    message = str(info.value)
    assert "rank 1: 4097 bytes, rank 2: 1099511627776 bytes" in message
    assert "HORDE_MAX_OBJECT_BYTES=4096" in message and "every worker" in message
