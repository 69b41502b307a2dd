"""The only code that turns a client's name into a repository (``Repo``).

``Router.resolve`` is the name of every registry request: local (pushed) repositories first, then ``route`` (the
three dialects: ``?ns=``, a host prefix in the path, the default upstream; Docker Hub's ``library/`` rule) and the
upstreams' rules (``Upstreams.admit``). ``Router.upstream`` is routing without local precedence (where a bare name
would be pulled through from: what the push rules check). ``image`` reads an image reference such as
``alpine:3.19`` the same way, for the admin commands.

``Upstreams`` is the set of upstreams names are routed over: the configured ones, the optional wildcard rule
(hosts matching its ``allow_hosts``, each given its own client on first use), and every upstream's repository
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
from typing import Protocol

from mirror.oci import errors
from mirror.oci.reference import (
    DOCKER_HUB,
    Digest,
    Repo,
    Tag,
    canonical_registry,
    docker_hub_path,
    looks_like_host,
    parse_image_ref,
    validate_name,
)

log = logging.getLogger(__name__)
# Wildcard hosts with a client at once; past this the least recently used idle one is dropped.
MAX_WILDCARD_HOSTS = 256


class Registries(Protocol):
    """What ``route`` needs to know about the configured upstreams."""

    def __contains__(self, registry: object) -> bool: ...

    @property
    def default(self) -> str: ...


def _split_host(name: str, default: str) -> tuple[str, str]:
    """A host-like first component names the registry (the rest is the path); else the name is on ``default``."""
    first, sep, rest = name.partition("/")
    if sep and looks_like_host(first):
        return canonical_registry(first), rest
    return default, name


def _repo(registry: str, path: str) -> Repo:
    validate_name(path)
    if registry == DOCKER_HUB:
        path = docker_hub_path(path)
    return Repo(registry, validate_name(path))


def route(name: str, ns: str | None, registries: Registries) -> Repo:
    """Map the name in a ``/v2/<name>/...`` path (plus containerd's ``?ns=``) to a repository on an upstream.

    Order: ``?ns=<host>`` (containerd ``hosts.toml`` mirrors), then a host-like first path component naming a
    configured upstream (podman ``registries.conf`` mirror locations with a path, containerd ``override_path``),
    else the default upstream (Docker's ``registry-mirrors`` sends bare names). A named registry that is not
    configured is refused, so the mirror never fetches from an arbitrary host.
    """
    if ns:
        if not looks_like_host(ns) and ns != DOCKER_HUB:
            raise errors.NameInvalid(f"invalid ns parameter {ns[:100]!r}")
        registry, path = canonical_registry(ns), name
    else:
        registry, path = _split_host(name, registries.default)
    if registry not in registries:
        raise errors.NameUnknown(
            f"registry {registry!r} is not configured as an upstream of this mirror",
            detail={"registry": registry},
        )
    return _repo(registry, path)


def image(text: str, default_registry: str = DOCKER_HUB) -> tuple[Repo, Tag | Digest]:
    """An image reference as an operator writes it: ``alpine`` is ``docker.io/library/alpine`` at ``latest``,
    ``ghcr.io/o/a@sha256:..`` stays. The registry need not be configured (a pin may name any image);
    ``oci.reference.format_image_ref`` writes the normalized form back."""
    text = text.strip()
    name, tag, digest = parse_image_ref(text)
    registry, path = _split_host(name, default_registry)
    if not path:
        raise errors.NameInvalid(f"not an image reference: {text[:200]!r}")
    repo = _repo(registry, path)
    if digest is not None:
        return repo, Digest.parse(digest)
    return repo, Tag.parse("latest" if tag is None else tag)


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


# The local repository a read of ``name`` (with ``?ns=``) means, or None when it is pulled through.
LocalNames = Callable[[str, str | None], Repo | None]


def _nothing_local(name: str, ns: str | None) -> Repo | None:
    return None


class Router:
    """Name -> ``Repo`` for every request. ``local`` is the local registry's lookup of pushed repositories; the
    composition root sets it once the local registry exists (which itself needs ``upstream``)."""

    def __init__(self, upstreams: Upstreams, local: LocalNames = _nothing_local):
        self.upstreams = upstreams
        self.local = local

    def resolve(self, name: str, ns: str | None) -> Repo:
        """Local (pushed) repositories first: they are authoritative for their names (README "Pushing images");
        else the upstream the name routes to, if its rules let it through."""
        return self.local(name, ns) or self.upstreams.admit(route(name, ns, self.upstreams))

    def upstream(self, name: str) -> Repo:
        """Where a bare name would be pulled through from, ignoring local repositories and the upstream's rules."""
        return route(name, None, self.upstreams)
