"""Which bare names accept a first push (README, "Pushing images").

With ``push_prefixes`` configured, exactly the names under those prefixes. Without (the default), every name
except Docker Hub's official ``library/`` namespace; ``push.registry.LocalRegistry.target`` also refuses names the
mirror already serves pulled through, unless the operator named them here. A name starting with a registry host
is always pulled through, never pushed.
"""

from __future__ import annotations

from mirror.oci.reference import looks_like_host


class PushRule:
    """Which bare names accept a first push (see the module docstring)."""

    def __init__(self, prefixes: tuple[str, ...] = ()):
        self.prefixes = tuple(p.strip() for p in prefixes if p.strip())

    @staticmethod
    def _under(name: str, prefix: str) -> bool:
        if prefix == "*":
            return True
        prefix = prefix.rstrip("/")
        return name == prefix or name.startswith(prefix + "/")

    def explicit(self, name: str) -> bool:
        """The operator named this namespace: pushes are accepted even where they shadow upstream content."""
        return any(self._under(name, p) for p in self.prefixes)

    def refusal(self, name: str) -> str | None:
        """Why a first push to ``name`` is refused, or None when the name may become local."""
        first, sep, _ = name.partition("/")
        if sep and looks_like_host(first):
            return (
                f"{name!r} starts with a registry host: it is pulled through from {first!r}, not pushed; "
                "push to a name without a host component"
            )
        if self.prefixes:
            if self.explicit(name):
                return None
            return f"this mirror accepts pushes only under {', '.join(self.prefixes)} (push_prefixes)"
        if name == "library" or name.startswith("library/"):
            return (
                "library/ is Docker Hub's namespace of official images, which this mirror pulls through; "
                "list it in push_prefixes to push there"
            )
        return None
