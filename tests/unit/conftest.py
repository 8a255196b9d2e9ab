"""Unit test settings shared by every module."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def files_only_their_owner_may_write() -> Iterator[None]:
    """Files the tests write are the admin's files of the tests, which uplinkd uses only when no
    group or other may write them (hookfiles): the same under a developer's umask 002."""
    before = os.umask(0o022)
    yield
    os.umask(before)
