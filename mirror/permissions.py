"""Repository permissions: which user may pull, push or delete which repositories, and who may use the admin API.

Pure (no I/O). A rule names users, repository patterns and actions (README "Repository permissions"):

- users: htpasswd user names, ``*`` (any authenticated user) or ``anonymous`` (a client without credentials;
  an htpasswd user who happens to be called "anonymous" is matched by ``*`` and by nothing else);
- repositories: globs over the name the client used in the path (``/v2/<name>/...``; with containerd's
  ``?ns=<host>`` the name is ``<host>/<name>``): ``*`` matches within one path component, ``**`` across
  components, ``?`` one character other than ``/``; everything else is literal. ``team-a/*`` matches
  ``team-a/app`` but not ``team-a/app/x``; ``team-a/**`` matches both; neither matches ``team-a`` itself;
- actions: ``pull``, ``push``, ``delete``, ``admin``.

For a repository action the first rule whose users and repositories both match decides: the actions it lists
are allowed, all others denied; when no rule matches, denied. ``admin`` concerns no repository: it is allowed
when any rule naming the user lists it. Without rules the policy is the built-in one (``Permissions.default``):
authenticated users may do everything, anonymous clients may pull when ``anonymous_pull`` is on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

ANONYMOUS = "anonymous"
ANY_USER = "*"


class Action(StrEnum):
    PING = "ping"  # GET /v2/
    PULL = "pull"
    PUSH = "push"
    DELETE = "delete"
    ADMIN = "admin"  # /admin/v1/*
    PEER = "peer"  # the replicas' internal endpoint: the cluster secret decides (api.peer), never htpasswd


GRANTABLE = (Action.PULL, Action.PUSH, Action.DELETE, Action.ADMIN)


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A repository glob as a regular expression over the whole name (see the module docstring)."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


@dataclass(frozen=True, slots=True)
class Rule:
    users: frozenset[str]
    repositories: tuple[re.Pattern[str], ...]
    actions: frozenset[Action]

    @classmethod
    def of(cls, users: Iterable[str], repositories: Iterable[str], actions: Iterable[str]) -> Rule:
        return cls(frozenset(users), tuple(compile_pattern(p) for p in repositories), frozenset(map(Action, actions)))

    def names(self, actor: str | None) -> bool:
        if actor is None:
            return ANONYMOUS in self.users
        return ANY_USER in self.users or actor in self.users

    def covers(self, name: str) -> bool:
        return any(pattern.fullmatch(name) for pattern in self.repositories)


class Permissions:
    """The rules, in order, plus the ``anonymous_pull`` switch: off, anonymous clients may do nothing at all."""

    def __init__(self, rules: Iterable[Rule], anonymous_pull: bool = True):
        self.rules = tuple(rules)
        self.anonymous_pull = anonymous_pull

    @classmethod
    def default(cls, anonymous_pull: bool = True) -> Permissions:
        """Today's policy: every authenticated user may do everything, anonymous clients may pull."""
        rules = [Rule.of([ANY_USER], ["**"], GRANTABLE)]
        if anonymous_pull:
            rules.append(Rule.of([ANONYMOUS], ["**"], [Action.PULL]))
        return cls(rules, anonymous_pull)

    def allows(self, actor: str | None, action: Action, name: str | None = None) -> bool:
        """Whether ``actor`` (None: anonymous) may do ``action`` on repository ``name``. ``name`` None is a
        request about no single repository (``_catalog``): allowed to anyone who may pull at all, and the
        listing is then filtered by repository."""
        if actor is None and not self.anonymous_pull:
            return False
        if action is Action.PING:
            return actor is not None
        if action is Action.ADMIN:
            return any(rule.names(actor) and Action.ADMIN in rule.actions for rule in self.rules)
        if name is None:
            return action is Action.PULL
        for rule in self.rules:
            if rule.names(actor) and rule.covers(name):
                return action in rule.actions
        return False
