"""Which upstream a pulled-through name goes to, and whether the operator lets it through.

``oci.reference.route`` reads the three dialects (``?ns=``, a host prefix in the path, the default upstream);
this module is the set of upstreams it routes over: the configured ones, the optional wildcard rule (hosts
matching its ``allow_hosts``, each given its own client on first use), and every upstream's repository
``allow``/``deny`` patterns. A registry that is neither configured nor allowed by the wildcard is refused before
any connection is made.

The wildcard's hosts are a bounded table, least recently used first: a new host past ``MAX_WILDCARD_HOSTS`` takes
the place of the least recently used host whose client is idle (that client is closed; the host gets a new one
if it comes back). Only when every one of them is in use is a new host refused (429, retry later).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase

from mirror.oci import errors
from mirror.oci.reference import Repo

log = logging.getLogger(__name__)
# Wildcard hosts with a client at once; past this the least recently used idle one is dropped.
MAX_WILDCARD_HOSTS = 256


@dataclass(frozen=True, slots=True)
class RepoRules:
    """``allow``/``deny`` patterns (shell-style, ``*`` crosses ``/``) over repository paths such as
    ``library/alpine``. Deny wins; an empty allow list allows everything."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def check(self, repo: Repo) -> None:
        if any(fnmatchcase(repo.path, p) for p in self.deny):
            raise errors.Denied(
                f"{repo} is denied by this mirror's rules for {repo.registry}", detail={"repository": str(repo)}
            )
        if self.allow and not any(fnmatchcase(repo.path, p) for p in self.allow):
            raise errors.Denied(
                f"{repo} is not in the repositories this mirror serves from {repo.registry}",
                detail={"repository": str(repo)},
            )


class Upstreams:
    """The registries routing may send a name to. ``add`` is how the composition root builds a client (and its
    tag policy) for a registry; it is called once per configured registry at start and once per wildcard host
    on first use (again after the host was dropped). ``idle`` tells whether a wildcard host's client has no
    call under way; ``drop`` closes it and forgets its policy."""

    def __init__(
        self,
        default: str,
        rules: dict[str, RepoRules],
        add: Callable[[str], None],
        wildcard_hosts: tuple[str, ...] = (),
        wildcard_rules: RepoRules | None = None,
        idle: Callable[[str], bool] = lambda registry: True,
        drop: Callable[[str], None] = lambda registry: None,
    ):
        self._default = default
        self._rules = rules
        self._add = add
        self._wildcard_hosts = tuple(p.lower() for p in wildcard_hosts)
        self._wildcard_rules = wildcard_rules or RepoRules()
        self._idle = idle
        self._drop = drop
        self._recent: OrderedDict[str, None] = OrderedDict()  # wildcard hosts with a client, oldest use first

    def __contains__(self, registry: object) -> bool:
        return isinstance(registry, str) and (registry in self._rules or self._wildcard_allows(registry))

    @property
    def default(self) -> str:
        return self._default

    @property
    def names(self) -> list[str]:
        return list(self._rules)

    @property
    def wildcard_hosts(self) -> list[str]:
        """The wildcard hosts that have a client now, least recently used first."""
        return list(self._recent)

    def _wildcard_allows(self, registry: str) -> bool:
        return any(fnmatchcase(registry, p) for p in self._wildcard_hosts)

    def admit(self, repo: Repo) -> Repo:
        """Check the repository against its upstream's rules; give a wildcard host its client on first use."""
        rules = self._rules.get(repo.registry)
        if rules is None:
            if not self._wildcard_allows(repo.registry):
                raise errors.NameUnknown(
                    f"registry {repo.registry!r} is not configured as an upstream of this mirror",
                    detail={"registry": repo.registry},
                )
            if len(self._recent) >= MAX_WILDCARD_HOSTS:
                self._make_room()
            log.info("wildcard upstream: first request for %s", repo.registry)
            self._add(repo.registry)
            rules = self._rules[repo.registry] = self._wildcard_rules
            self._recent[repo.registry] = None
        elif repo.registry in self._recent:
            self._recent.move_to_end(repo.registry)
        rules.check(repo)
        return repo

    def _make_room(self) -> None:
        """Drop the least recently used wildcard host whose client is idle, or refuse (every one is busy)."""
        victim = next((registry for registry in self._recent if self._idle(registry)), None)
        if victim is None:
            raise errors.TooManyRequests(
                f"all {MAX_WILDCARD_HOSTS} wildcard upstream hosts are in use; retry later",
                headers={"Retry-After": "1"},
            )
        del self._recent[victim]
        del self._rules[victim]
        log.info("wildcard upstream: dropped %s, the least recently used of %d hosts", victim, MAX_WILDCARD_HOSTS)
        self._drop(victim)
