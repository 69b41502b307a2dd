"""Another process holding a fetch's file lock (``storage.fetchlocks``), for the tests of fetch coordination across
processes: it can announce a fetch, run statements when told, and die by SIGKILL (the kernel releases its lock,
nothing else is cleaned), as a mirror process crashing mid-fetch does."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path


async def hold(lock_path: Path, announce: str = "", then: str = "") -> asyncio.subprocess.Process:
    """Another process holding a fetch's lock (with ``announce``, having announced it); sent a line, it runs the
    Python statements ``then`` (``fd`` is its lock file) and prints "done"."""
    code = (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(lock_path)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        f"os.write(fd, {announce.encode()!r})\n"
        "print('held', flush=True)\n"
        "sys.stdin.readline()\n"
        f"{then}\n"
        "print('done', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None and await proc.stdout.readline() == b"held\n"
    return proc


async def killed(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:  # (killed already: nothing to do)
        proc.kill()  # SIGKILL: the kernel releases its lock, nothing else is cleaned
    await proc.wait()


async def tell(proc: asyncio.subprocess.Process) -> None:
    """Run the holder's ``then`` statements and wait until they ran."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"go\n")
    await proc.stdin.drain()
    assert await proc.stdout.readline() == b"done\n"
