"""A test host of the test's own: a private network namespace joined to this machine by a veth pair.

Tests use only loopback addresses, or the addresses of such a test host. Some behaviour only shows on an address
that is not loopback (Docker treats a loopback registry as insecure-allowed and so never checks its certificate);
a test host gives one without touching the machine's real interfaces. Its /30 exists only on this veth pair::

    this machine (network namespace of the tests, dockerd too)     mirror-tls-<random> (created here)
      veth <name>h  10.251.X.Y+1/30   <------------------------>   veth <name>n  10.251.X.Y+2/30
                                                                    programs started with ``host.argv(...)``

The namespace and the veth pair are removed on exit, also when the test fails (deleting the namespace destroys
its end of the pair, which destroys the other end; the host end is deleted explicitly as well).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from tests.support.ops import require

PREFIX = ipaddress.IPv4Network("10.251.0.0/16")


@dataclass(frozen=True)
class NamespaceHost:
    name: str  # the network namespace
    ip: str  # the test host's address, inside the namespace
    host_ip: str  # this machine's end of the veth pair

    def argv(self, *argv: str) -> list[str]:
        """``argv`` run inside the test host's network namespace (``ip netns exec`` execs it: same pid)."""
        return [require("ip"), "netns", "exec", self.name, *argv]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([require("ip"), *args], capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _free_subnet() -> ipaddress.IPv4Network:
    """A random /30 of 10.251.0.0/16 that no interface of this machine uses (tests may run side by side)."""
    used = _ip("-4", "-o", "addr", "show").stdout
    subnets = list(PREFIX.subnets(new_prefix=30))
    for _ in range(100):
        subnet = random.choice(subnets)
        if not any(str(address) in used for address in subnet):
            return subnet
    raise AssertionError("no free /30 in 10.251.0.0/16")


@contextlib.contextmanager
def namespace_host() -> Iterator[NamespaceHost]:
    """A fresh network namespace ``mirror-tls-<random>`` with a veth pair to this machine; removed on exit."""
    suffix = os.urandom(3).hex()
    name, host_end, ns_end = f"mirror-tls-{suffix}", f"mtls{suffix}h", f"mtls{suffix}n"
    subnet = _free_subnet()
    host_ip, ns_ip = (str(address) for address in list(subnet.hosts())[:2])
    _ip("netns", "add", name)
    try:
        _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        _ip("link", "set", ns_end, "netns", name)
        _ip("addr", "add", f"{host_ip}/30", "dev", host_end)
        _ip("link", "set", host_end, "up")
        _ip("-n", name, "addr", "add", f"{ns_ip}/30", "dev", ns_end)
        _ip("-n", name, "link", "set", ns_end, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        yield NamespaceHost(name, ns_ip, host_ip)
    finally:
        _ip("link", "del", host_end, check=False)  # gone already if it was never made or left with the namespace
        _ip("netns", "del", name, check=False)
