"""A module's own broker and Triton, for modules that must not share the session's: they kill or restart the
services, or need a model repository no other module has exported versions into. Such a module overrides the
session's fixtures with its own:

    @pytest.fixture(scope="module")
    def local_infra(tmp_path_factory):
        yield from own_infra(tmp_path_factory)

(`kafka` and `triton` then follow it, with module scope too: see test_faults.py.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import LocalInfra


def own_infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalInfra]:
    handle = LocalInfra(tmp_path_factory.mktemp("own-infra"))
    try:
        yield handle
    finally:
        handle.stop()
