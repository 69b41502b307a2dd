"""``Range`` parsing for blob GETs: what clients resuming a download send, and what they must not get away with."""

from __future__ import annotations

import pytest

from mirror.api.ranges import parse_range
from mirror.oci.errors import RangeInvalid


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        pytest.param(None, 100, None, id="no header -> whole body"),
        pytest.param("bytes=0-", 100, (0, 100), id="open range from 0"),
        pytest.param("bytes=40-", 100, (40, 100), id="resume from N (containerd, dockerd)"),
        pytest.param("bytes=10-19", 100, (10, 20), id="closed range"),
        pytest.param("bytes=90-500", 100, (90, 100), id="end past the blob is clipped"),
        pytest.param("bytes=-10", 100, (90, 100), id="suffix range"),
        pytest.param("bytes=-500", 100, (0, 100), id="suffix longer than the blob"),
        pytest.param("bytes=99-99", 100, (99, 100), id="last byte"),
    ],
)
def test_satisfiable(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"),
    [
        pytest.param("bytes=100-", 100, id="start at the end"),
        pytest.param("bytes=20-10", 100, id="end before start"),
        pytest.param("bytes=-0", 100, id="empty suffix"),
        pytest.param("bytes=-", 100, id="no numbers"),
        pytest.param("bytes=0-1,5-6", 100, id="multiple ranges"),
        pytest.param("items=0-1", 100, id="wrong unit"),
        pytest.param("bytes=a-b", 100, id="not numbers"),
        pytest.param("bytes=0-", 0, id="any range of an empty blob"),
    ],
)
def test_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(RangeInvalid) as info:
        parse_range(header, size)
    assert info.value.status == 416
    assert info.value.headers["Content-Range"] == f"bytes */{size}"
