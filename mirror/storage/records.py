"""The records an index keeps about stored content, and their JSON form.

The disk index (``storage.index``, diskcache) stores these dataclasses as they are (pickled by diskcache); the
shared index of replicas (``storage.redisindex``) stores them as the JSON below. Both read a value through
``*_from`` here, which answers None for anything that is not a well-formed record, so a damaged or foreign value
reads as "not recorded" (a miss, fetched again), never as an exception on the request path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mirror.oci.errors import RegistryError
from mirror.oci.reference import Digest


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    media_type: str
    size: int


@dataclass(frozen=True, slots=True)
class TagRecord:
    digest: Digest
    media_type: str
    size: int
    checked_at: float  # wall-clock time the upstream last confirmed this mapping


def manifest_json(record: ManifestRecord) -> str:
    return json.dumps({"media_type": record.media_type, "size": record.size}, separators=(",", ":"))


def tag_json(record: TagRecord) -> str:
    value = {"digest": str(record.digest), "media_type": record.media_type, "size": record.size}
    return json.dumps({**value, "checked_at": record.checked_at}, separators=(",", ":"))


def _object(value: object) -> dict[str, Any] | None:
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return value if isinstance(value, dict) else None


def manifest_from(value: object) -> ManifestRecord | None:
    """A stored manifest record: the dataclass itself (the disk index) or its JSON (Redis)."""
    if isinstance(value, ManifestRecord):
        return value
    fields = _object(value)
    if fields is None or not isinstance(fields.get("media_type"), str) or not isinstance(fields.get("size"), int):
        return None
    return ManifestRecord(fields["media_type"], fields["size"])


def tag_from(value: object) -> TagRecord | None:
    """A stored tag record: the dataclass itself (the disk index) or its JSON (Redis)."""
    if isinstance(value, TagRecord):
        return value
    fields = _object(value)
    if fields is None:
        return None
    try:
        digest = Digest.parse(fields["digest"])
        media_type, size, checked_at = fields["media_type"], fields["size"], fields["checked_at"]
    except (KeyError, AttributeError, RegistryError):  # a field missing, not a string, not a digest
        return None
    if not isinstance(media_type, str) or not isinstance(size, int) or not isinstance(checked_at, int | float):
        return None
    return TagRecord(digest, media_type, size, float(checked_at))


def descriptors_from(value: object) -> tuple[dict[str, Any], ...]:
    """The referrer descriptors stored under one subject: a tuple of dicts (disk) or JSON objects (Redis)."""
    items = value if isinstance(value, tuple | list) else ()
    found = (item if isinstance(item, dict) else _object(item) for item in items)
    return tuple(d for d in found if d is not None)
