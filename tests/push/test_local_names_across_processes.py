"""Several serving processes on one data dir (``--workers``): a push through one makes its repository local for
all of them at once, so a pull through another right after the push gets the pushed image, never a lookup of the
name upstream. The names travel through the index; ``storage.counter.SharedCounter`` tells the others to read
them again."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from mirror.storage.counter import SharedCounter
from tests.support.ops import COORDINATED, NO_UPSTREAM, Mirror
from tests.support.plain_http import pull, push_random_image


def test_a_bump_in_one_mapping_is_seen_by_another_and_none_is_lost(tmp_path: Path) -> None:
    path = tmp_path / "count"
    first, second = SharedCounter(path), SharedCounter(path)
    assert first.value() == second.value() == 0
    first.bump_sync()
    assert second.value() == 1

    def bump(counter: SharedCounter) -> None:
        for _ in range(250):
            counter.bump_sync()

    threads = [threading.Thread(target=bump, args=(c,)) for c in (first, second, first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert first.value() == second.value() == 1001
    first.close()
    assert SharedCounter(path).value() == 1001  # kept in the file


@pytest.mark.integration
def test_an_image_pushed_through_one_process_is_pulled_through_the_other_at_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with Mirror(data, NO_UPSTREAM, entry=COORDINATED) as first, Mirror(data, NO_UPSTREAM, entry=COORDINATED) as second:
        for n in range(5):  # each a first push of a new name, pulled through the other process right away
            pushing, pulling = (first, second) if n % 2 else (second, first)
            layer = os.urandom(1024)
            image = push_random_image(pushing.url, f"team/app{n}", "1.0", [layer])
            got = pull(pulling.url, f"team/app{n}", "1.0")
            assert got["manifest"] == image["manifest"]
