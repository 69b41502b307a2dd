"""The ``[[access]]`` tables of the config file: repository permissions, read into plain rules for
``mirror.permissions`` (which never reads ``Config`` itself)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from mirror.config import Config, ConfigError

ACCESS_ACTIONS = ("pull", "push", "delete", "admin")


@dataclass(frozen=True, slots=True)
class AccessRule:
    """One ``[[access]]`` table: these users may do these actions on repositories matching these patterns."""

    users: tuple[str, ...]  # htpasswd users, "*" (any authenticated user), "anonymous"
    repositories: tuple[str, ...] = ()  # globs: * within a path component, ** across; () for admin-only rules
    actions: tuple[str, ...] = ()  # ACCESS_ACTIONS; () denies everything on the repositories it matches


def _strings(table: Mapping[str, Any], key: str, number: int) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"[[access]] entry {number}: {key} must be a list of non-empty strings")
    return tuple(value)


def access_rules(config: Config) -> tuple[AccessRule, ...]:
    """The ``[[access]]`` rules in order; () when there are none (the built-in permissions apply)."""
    tables = config.extra.get("access", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("access must be an array of tables: [[access]] users = [...] repositories = [...] ...")
    rules = []
    for number, table in enumerate(tables, 1):
        unknown = set(table) - {f.name for f in fields(AccessRule)}
        if unknown:
            raise ConfigError(f"unknown keys in [[access]] entry {number}: {', '.join(sorted(unknown))}")
        rule = AccessRule(*(_strings(table, key, number) for key in ("users", "repositories", "actions")))
        bad = set(rule.actions) - set(ACCESS_ACTIONS)
        if bad:
            raise ConfigError(f"[[access]] entry {number}: unknown actions {', '.join(sorted(bad))} "
                              f"(use {', '.join(ACCESS_ACTIONS)})")  # fmt: skip
        if not rule.users:
            raise ConfigError(f'[[access]] entry {number} needs users (names, "*" or "anonymous")')
        if not rule.repositories and set(rule.actions) - {"admin"}:
            raise ConfigError(f"[[access]] entry {number} grants {', '.join(rule.actions)} but names no repositories")
        rules.append(rule)
    if rules and config.htpasswd is None:
        raise ConfigError("[[access]] rules need --htpasswd: without it every client is anonymous (see anonymous_push)")
    return tuple(rules)
