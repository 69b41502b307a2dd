"""Webhooks with several processes on one data dir: each push is notified once, by the process that took it (an
event lives in the memory of the process whose request made it; no process replays another's)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from tests.support.ops import COORDINATED, NO_UPSTREAM, Mirror
from tests.support.plain_http import push_random_image
from tests.support.pushing import WebhookReceiver

pytestmark = pytest.mark.integration


def test_each_push_is_notified_once_whichever_process_takes_it(tmp_path: Path) -> None:
    with WebhookReceiver() as webhook:
        flags = ("--notify-url", webhook.url)
        a = Mirror(tmp_path / "data", NO_UPSTREAM, *flags, log=tmp_path / "a.log", entry=COORDINATED)
        try:
            b = Mirror(tmp_path / "data", NO_UPSTREAM, *flags, log=tmp_path / "b.log", entry=COORDINATED)
        except BaseException:
            a.stop()
            raise
        try:
            pushed = [push_random_image((a, b)[n % 2].url, "my/app", f"v{n}", [os.urandom(1000)]) for n in range(4)]
            # Last, one more push through each: a process sends its events in order, so once both of these have
            # arrived every event before them (and any duplicate of one) has arrived too.
            last = [push_random_image(m.url, "my/last", f"from-{n}", [os.urandom(10)]) for n, m in enumerate((a, b))]
            events = webhook.wait_for(len(pushed) + len(last))
            while not {e["target"].get("tag") for e in events} >= {"from-0", "from-1"}:
                events = webhook.wait_for(len(events) + 1)
        finally:
            a.stop()
            b.stop()
    seen = Counter(
        (e["action"], e["target"]["repository"], e["target"]["digest"], e["target"].get("tag")) for e in events
    )
    expected = {("push", img["repo"], img["manifest"], img["tag"]) for img in pushed + last}
    assert set(seen) == expected and set(seen.values()) == {1}, seen
    # Each event came from the process that took the push (its own instance id), two processes in all.
    by_tag = {e["target"].get("tag"): e["source"]["instanceID"] for e in events}
    assert len({by_tag["v0"], by_tag["v2"], by_tag["from-0"]}) == 1
    assert len({by_tag["v1"], by_tag["v3"], by_tag["from-1"]}) == 1
    assert by_tag["v0"] != by_tag["v1"]
