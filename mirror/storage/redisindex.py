"""The index of replicas sharing a bucket (``[cluster]``): the same records as the disk index (``storage.index``),
kept in Redis so that a tag one replica cached is served by every other one.

Keys (``storage.cluster.key``, all under ``mirror:``); values are the JSON of ``storage.records``:

    mirror:manifests                            hash  <digest> -> ManifestRecord
    mirror:tags:<registry>/<path>               hash  <tag> -> TagRecord (its field names: the tags/list fallback)
    mirror:repos                                zset, every score 0: "<registry>/<path>" of every repository,
                                                pulled through or local (the web page pages it by ZRANGEBYLEX)
    mirror:pulled                               set   "<registry>/<path>" pulled through (a push may not shadow it)
    mirror:origin:<digest>                      set   registries the content was fetched from (``may_serve``)
    mirror:local-repos                          set   names of local (pushed) repositories
    mirror:pushed:<digest>                      set   local repositories a blob or manifest is linked into
    mirror:pushed-digests                       set   digests whose pushed set is non-empty (never evicted)
    mirror:referrers:<name>:<subject>           hash  <digest> -> descriptor of a referrer of <subject> in <name>
    mirror:referrer-order:<name>:<subject>      list  those digests, oldest first (the order the API answers)

Every request-path call is one round trip (a pipeline; MULTI/EXEC where writes go together, a Lua script where a
write depends on a read), O(1) or one range. Walks for gc, reconcile and the admin commands use cursors (HSCAN,
SSCAN, ZRANGEBYLEX pages), never KEYS. Redis unreachable or failing is ``StoreUnavailable``: a 503 UNAVAILABLE
for the client, never a 500. Async methods use the link's asyncio client; ``*_sync`` ones its blocking client
(threads, the CLI).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from redis.exceptions import RedisError

from mirror.oci.reference import LOCAL, Digest, Repo
from mirror.storage.base import StoreUnavailable
from mirror.storage.cluster import RedisLink, key
from mirror.storage.records import (
    ManifestRecord,
    TagRecord,
    descriptors_from,
    manifest_from,
    manifest_json,
    tag_from,
    tag_json,
)

T = TypeVar("T")
MANIFESTS, REPOS, PULLED = key("manifests"), key("repos"), key("pulled")
LOCAL_REPOS, PUSHED_DIGESTS = key("local-repos"), key("pushed-digests")
PAGE = 500  # names per ZRANGEBYLEX of a walk; entries per HSCAN/SSCAN step
SEARCH_BUDGET = 2000  # names one call of the listing's search script looks at
# A page of the repository listing whose names contain ARGV[2] (lower case; string.lower is ASCII), after the
# bound ARGV[1], at most ARGV[3] of them, looking at no more than ARGV[4] names in one call (Redis runs one script
# at a time: the budget keeps each call short). Returns the matches, the last name looked at, how many were.
SEARCH = """
local names = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], '+', 'LIMIT', 0, tonumber(ARGV[4]))
local found, limit = {}, tonumber(ARGV[3])
for i, name in ipairs(names) do
  if string.find(string.lower(name), ARGV[2], 1, true) then
    found[#found + 1] = name
    if #found == limit then return {found, name, i} end
  end
end
return {found, names[#names] or '', #names}
"""
# Unlink: drop the name, and the digest from the pushed set once no repository holds it (one atomic step).
UNLINK = """
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('SCARD', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[2]) end
return 1
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _repo(name: str) -> Repo:
    registry, _, path = name.partition("/")
    return Repo(registry, path)


def _names(values: list[bytes] | set[bytes]) -> tuple[str, ...]:
    return tuple(sorted(_text(v) for v in values))


@dataclass(frozen=True, slots=True)
class Plan(Generic[T]):
    """One round trip: the commands, in one MULTI/EXEC when ``atomic``, and what their replies mean. The same
    plan runs on the asyncio client (``RedisIndex._run``) or the blocking one (``_run_sync``)."""

    commands: tuple[tuple[Any, ...], ...]
    decode: Callable[[list[Any]], T]
    atomic: bool = False


def _none(replies: list[Any]) -> None:
    return None


def _unavailable(exc: Exception) -> StoreUnavailable:
    return StoreUnavailable(f"the cluster's Redis cannot be reached or failed: {exc}")


class RedisIndex:
    """The ``RegistryIndex`` over the replicas' Redis. The link is the app's: ``close`` leaves it open."""

    def __init__(self, link: RedisLink):
        self._link = link

    def close(self) -> None:
        return None

    async def _run(self, plan: Plan[T]) -> T:
        try:
            if len(plan.commands) == 1 and not plan.atomic:  # the usual read: no pipeline to build (~0.1 ms less)
                reply = await self._link.aio.execute_command(*plan.commands[0])  # type: ignore[no-untyped-call]
                return plan.decode([reply])
            async with self._link.aio.pipeline(transaction=plan.atomic) as pipe:
                for command in plan.commands:
                    pipe.execute_command(*command)
                return plan.decode(await pipe.execute())
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc

    def _run_sync(self, plan: Plan[T]) -> T:
        try:
            if len(plan.commands) == 1 and not plan.atomic:
                return plan.decode([self._link.sync.execute_command(*plan.commands[0])])  # type: ignore[no-untyped-call]
            with self._link.sync.pipeline(transaction=plan.atomic) as pipe:
                for command in plan.commands:
                    pipe.execute_command(*command)  # type: ignore[no-untyped-call]  # redis-py's sync pipeline
                return plan.decode(pipe.execute())
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc

    # manifests -------------------------------------------------------------------------------------------
    @staticmethod
    def _get_manifest(digest: Digest) -> Plan[ManifestRecord | None]:
        return Plan((("HGET", MANIFESTS, str(digest)),), lambda r: manifest_from(r[0]))

    def get_manifest_sync(self, digest: Digest) -> ManifestRecord | None:
        return self._run_sync(self._get_manifest(digest))

    async def get_manifest(self, digest: Digest) -> ManifestRecord | None:
        return await self._run(self._get_manifest(digest))

    async def put_manifest(self, digest: Digest, record: ManifestRecord) -> None:
        await self._run(Plan((("HSET", MANIFESTS, str(digest), manifest_json(record)),), _none))

    @staticmethod
    def _delete_manifest(digest: Digest) -> Plan[None]:
        return Plan((("HDEL", MANIFESTS, str(digest)),), _none)

    async def delete_manifest(self, digest: Digest) -> None:
        await self._run(self._delete_manifest(digest))

    def delete_manifest_sync(self, digest: Digest) -> None:
        self._run_sync(self._delete_manifest(digest))

    # tags ------------------------------------------------------------------------------------------------
    @staticmethod
    def _get_tag(repo: Repo, tag: str) -> Plan[TagRecord | None]:
        return Plan((("HGET", key("tags", str(repo)), tag),), lambda r: tag_from(r[0]))

    async def get_tag(self, repo: Repo, tag: str) -> TagRecord | None:
        return await self._run(self._get_tag(repo, tag))

    def get_tag_sync(self, registry: str, path: str, tag: str) -> TagRecord | None:
        return self._run_sync(self._get_tag(Repo(registry, path), tag))

    async def put_tag(self, repo: Repo, tag: str, record: TagRecord) -> None:
        commands = (("HSET", key("tags", str(repo)), tag, tag_json(record)), ("ZADD", REPOS, 0, str(repo)))
        await self._run(Plan(commands, _none, atomic=True))

    @staticmethod
    def _delete_tag(repo: Repo, tag: str) -> Plan[None]:
        return Plan((("HDEL", key("tags", str(repo)), tag),), _none)

    async def delete_tag(self, repo: Repo, tag: str) -> None:
        await self._run(self._delete_tag(repo, tag))

    def delete_tag_sync(self, registry: str, path: str, tag: str) -> None:
        self._run_sync(self._delete_tag(Repo(registry, path), tag))

    @staticmethod
    def _list_tags(repo: Repo) -> Plan[tuple[str, ...]]:
        return Plan((("HKEYS", key("tags", str(repo))),), lambda r: _names(r[0]))

    async def list_tags(self, repo: Repo) -> tuple[str, ...]:
        return await self._run(self._list_tags(repo))

    def list_tags_sync(self, repo: Repo) -> tuple[str, ...]:
        return self._run_sync(self._list_tags(repo))

    # repositories pulled through, and where stored content came from -------------------------------------
    async def mark_pulled(self, repo: Repo) -> None:
        await self._run(Plan((("SADD", PULLED, str(repo)), ("ZADD", REPOS, 0, str(repo))), _none, atomic=True))

    async def pulled(self, repo: Repo) -> bool:
        """Whether content was ever pulled through under ``repo`` (tags aside: see ``list_tags``)."""
        return await self._run(Plan((("SISMEMBER", PULLED, str(repo)),), lambda r: bool(r[0])))

    @staticmethod
    def _may_serve(digest: Digest, registry: str) -> Plan[bool]:
        def decode(replies: list[Any]) -> bool:
            origins, pushed = {_text(o) for o in replies[0]}, replies[1]
            # As on disk: nothing recorded is content from before origins were recorded, or a miss, unless pushed.
            return registry in origins if origins else not pushed

        commands = (("SMEMBERS", key("origin", str(digest))), ("EXISTS", key("pushed", str(digest))))
        return Plan(commands, decode, atomic=True)

    async def may_serve(self, digest: Digest, registry: str) -> bool:
        """Whether stored content ``digest`` may be answered under a pull-through name of ``registry``."""
        return await self._run(self._may_serve(digest, registry))

    def may_serve_sync(self, digest: Digest, registry: str) -> bool:
        return self._run_sync(self._may_serve(digest, registry))

    async def add_origin(self, digest: Digest, registry: str) -> None:
        await self._run(Plan((("SADD", key("origin", str(digest)), registry),), _none))

    # local (pushed) repositories -------------------------------------------------------------------------
    def local_repos_sync(self) -> tuple[str, ...]:
        return self._run_sync(Plan((("SMEMBERS", LOCAL_REPOS),), lambda r: _names(r[0])))

    async def add_local_repo(self, name: str) -> None:
        commands = (("SADD", LOCAL_REPOS, name), ("ZADD", REPOS, 0, str(Repo(LOCAL, name))))
        await self._run(Plan(commands, _none, atomic=True))

    async def link(self, name: str, digest: Digest) -> None:
        """Record that a local repository holds a blob or manifest (an upload, a mount, a manifest PUT)."""
        commands = (("SADD", key("pushed", str(digest)), name), ("SADD", PUSHED_DIGESTS, str(digest)))
        await self._run(Plan(commands, _none, atomic=True))

    async def unlink(self, name: str, digest: Digest) -> bool:
        """Remove a blob or manifest from a local repository; the bytes stay until garbage collection."""
        command = ("EVAL", UNLINK, 2, key("pushed", str(digest)), PUSHED_DIGESTS, name, str(digest))
        return await self._run(Plan((command,), lambda r: bool(r[0])))

    @staticmethod
    def _pushed_in(digest: Digest) -> Plan[frozenset[str]]:
        return Plan((("SMEMBERS", key("pushed", str(digest))),), lambda r: frozenset(_names(r[0])))

    def pushed_in_sync(self, digest: Digest) -> frozenset[str]:
        return self._run_sync(self._pushed_in(digest))

    def is_pushed_sync(self, digest: Digest) -> bool:
        """Whether any local repository holds this digest: such content is never evicted."""
        return self._run_sync(Plan((("EXISTS", key("pushed", str(digest))),), lambda r: bool(r[0])))

    async def linked(self, name: str, digest: Digest) -> bool:
        return await self._run(Plan((("SISMEMBER", key("pushed", str(digest)), name),), lambda r: bool(r[0])))

    # referrers (OCI 1.1) of content in local repositories ------------------------------------------------
    async def add_referrer(self, name: str, subject: Digest, descriptor: dict[str, Any]) -> None:
        order, table = key("referrer-order", name, str(subject)), key("referrers", name, str(subject))
        digest = str(descriptor["digest"])
        commands = (
            ("LREM", order, 0, digest),  # one entry per referrer: a manifest put again moves to the end
            ("RPUSH", order, digest),
            ("HSET", table, digest, json.dumps(descriptor)),
        )
        await self._run(Plan(commands, _none, atomic=True))

    async def remove_referrer(self, name: str, subject: Digest, digest: Digest) -> None:
        order, table = key("referrer-order", name, str(subject)), key("referrers", name, str(subject))
        commands = (("LREM", order, 0, str(digest)), ("HDEL", table, str(digest)))
        await self._run(Plan(commands, _none, atomic=True))

    @staticmethod
    def _referrers(name: str, subject: Digest) -> Plan[tuple[dict[str, Any], ...]]:
        def decode(replies: list[Any]) -> tuple[dict[str, Any], ...]:
            order, table = replies[0], replies[1]
            return descriptors_from([table[d] for d in order if d in table])

        order, table = key("referrer-order", name, str(subject)), key("referrers", name, str(subject))
        return Plan((("LRANGE", order, 0, -1), ("HGETALL", table)), decode, atomic=True)

    async def referrers(self, name: str, subject: Digest) -> tuple[dict[str, Any], ...]:
        return await self._run(self._referrers(name, subject))

    def referrers_sync(self, name: str, subject: Digest) -> tuple[dict[str, Any], ...]:
        return self._run_sync(self._referrers(name, subject))

    # walks for housekeeping (gc, reconcile, pins, ``mirror ls``): threads only, never the hot path -------------
    def _walk(self, walk: Callable[[], Iterator[T]]) -> Iterator[T]:
        try:
            yield from walk()
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc

    def iter_manifests_sync(self) -> Iterator[tuple[Digest, ManifestRecord]]:
        for field, value in self._walk(lambda: self._link.sync.hscan_iter(MANIFESTS, count=PAGE)):
            record = manifest_from(value)
            if record is not None:
                yield Digest.parse(_text(field)), record

    def iter_tags_sync(self) -> Iterator[tuple[str, str, str, TagRecord]]:
        """Every tag record as (registry, repo path, tag, record), a page of repositories at a time."""
        for page in self._walk(self._repo_pages):
            replies = self._run_sync(Plan(tuple(("HGETALL", key("tags", name)) for name in page), lambda r: r))
            for name, tags in zip(page, replies, strict=True):
                registry, _, path = name.partition("/")
                for tag, value in sorted(tags.items()):
                    record = tag_from(value)
                    if record is not None:
                        yield registry, path, _text(tag), record

    def pushed_digests_sync(self) -> set[str]:
        """Digests a local (pushed) repository holds: never evicted."""
        return {_text(d) for d in self._walk(lambda: self._link.sync.sscan_iter(PUSHED_DIGESTS, count=PAGE))}

    # the paged listing of repository names (the web page) ------------------------------------------------------
    def _repo_pages(self, after: str = "") -> Iterator[list[str]]:
        """The repository names after ``after``, in name order, ``PAGE`` per ZRANGEBYLEX."""
        while True:
            low = "(" + after if after else "-"
            page = [_text(n) for n in self._link.sync.zrangebylex(REPOS, low, "+", start=0, num=PAGE)]
            if not page:
                return
            yield page
            after = page[-1]

    def repositories_sync(self, search: str = "", after: str = "", limit: int = 50) -> list[Repo]:
        """Up to ``limit`` repositories (pulled through and local) whose "<registry>/<path>" contains ``search``
        (ASCII case-insensitive), in name order, after the name ``after``: one ZRANGEBYLEX without a search; with
        one, a script filters the names in Redis, ``SEARCH_BUDGET`` of them per call, until ``limit`` matched."""
        if limit == 0:
            return []
        if not search:
            command = ("ZRANGEBYLEX", REPOS, "(" + after if after else "-", "+", "LIMIT", 0, limit)
            return self._run_sync(Plan((command,), lambda r: [_repo(_text(n)) for n in r[0]]))
        found: list[str] = []
        while len(found) != limit:
            bound = "(" + after if after else "-"
            args = (bound, search.lower(), limit - len(found), SEARCH_BUDGET)
            script = ("EVAL", SEARCH, 1, REPOS, *args)
            matches, last, looked = self._run_sync(Plan((script,), lambda r: r[0]))
            found.extend(_text(m) for m in matches)
            if looked < SEARCH_BUDGET or not last:
                break
            after = _text(last)
        return [_repo(name) for name in found]

    def repository_known_sync(self, repo: Repo) -> bool:
        return self._run_sync(Plan((("ZSCORE", REPOS, str(repo)),), lambda r: r[0] is not None))

    def healthy_sync(self) -> bool:
        """Redis answers (for /readyz)."""
        return self._run_sync(Plan((("PING",),), lambda r: True))
