"""Which upstream a pulled-through name goes to, and whether the operator lets it through.

``oci.reference.route`` reads the three dialects (``?ns=``, a host prefix in the path, the default upstream);
this module is the set of upstreams it routes over: the configured ones, the optional wildcard rule (hosts
matching its ``allow_hosts``, each given its own client on first use), and every upstream's repository
``allow``/``deny`` patterns. A registry that is neither configured nor allowed by the wildcard is refused before
any connection is made.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase

from mirror.oci import errors
from mirror.oci.reference import Repo

log = logging.getLogger(__name__)
# Hosts the wildcard rule may create clients for; past this the operator's patterns are too wide to be a policy.
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
    on first use."""

    def __init__(
        self,
        default: str,
        rules: dict[str, RepoRules],
        add: Callable[[str], None],
        wildcard_hosts: tuple[str, ...] = (),
        wildcard_rules: RepoRules | None = None,
    ):
        self._default = default
        self._rules = rules
        self._add = add
        self._wildcard_hosts = tuple(p.lower() for p in wildcard_hosts)
        self._wildcard_rules = wildcard_rules or RepoRules()

    def __contains__(self, registry: object) -> bool:
        return isinstance(registry, str) and (registry in self._rules or self._wildcard_allows(registry))

    @property
    def default(self) -> str:
        return self._default

    @property
    def names(self) -> list[str]:
        return list(self._rules)

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
            if len(self._rules) >= MAX_WILDCARD_HOSTS:
                raise errors.Denied(f"this mirror already serves {MAX_WILDCARD_HOSTS} registries; ask its operator")
            log.info("wildcard upstream: first request for %s", repo.registry)
            self._add(repo.registry)
            rules = self._rules[repo.registry] = self._wildcard_rules
        rules.check(repo)
        return repo
