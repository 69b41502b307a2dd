"""The import direction of STYLE.md, checked by walking every module's imports.

cli -> app -> api -> (pullthrough, push) -> inflight -> (storage, upstream) -> oci; ``oci``, ``metrics``, ``config``
and ``log`` import nothing from the package; ``storage`` and ``upstream`` never import each other; ``aiohttp.web``
only in ``api/`` and ``app``; ``ClientSession`` only in ``upstream/``; ``diskcache`` only in ``storage/``; only
``app`` and ``cli`` read ``Config``; routes are registered in ``api/routes.py`` only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mirror"


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def imports(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def area(module: str) -> str:
    """``mirror.storage.blobs`` -> ``storage``; ``mirror.app`` -> ``app``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


FORBIDDEN: dict[str, set[str]] = {
    "oci": {"storage", "upstream", "inflight", "pullthrough", "push", "api", "app", "cli", "config"},
    "metrics": {"oci", "storage", "upstream", "inflight", "pullthrough", "push", "api", "app", "cli", "config"},
    "config": {"storage", "upstream", "inflight", "pullthrough", "push", "api", "app", "cli", "metrics"},
    "log": {"storage", "upstream", "inflight", "pullthrough", "push", "api", "app", "cli", "config"},
    "storage": {"upstream", "inflight", "pullthrough", "push", "api", "app", "cli", "config"},
    "upstream": {"storage", "inflight", "pullthrough", "push", "api", "app", "cli", "config"},
    "inflight": {"pullthrough", "push", "api", "app", "cli", "config"},
    "pullthrough": {"api", "app", "cli", "config"},
    # push/ (local repositories, the chunk protocol) sees stored content and the protocol only: never the HTTP
    # layer, the pull side's package, who may push (access), the webhooks or the admin commands.
    "push": {"api", "app", "cli", "config", "pull", "admin", "auth", "credentials", "permissions", "notify", "routing"},
    "auth": {"storage", "upstream", "inflight", "pullthrough", "push", "api", "app", "cli", "config"},
    "credentials": {"storage", "upstream", "inflight", "pullthrough", "push", "api", "app", "cli", "config", "auth"},
    "permissions": {"storage", "upstream", "inflight", "pullthrough", "push", "api", "app", "cli", "config", "auth"},
    "notify": {"storage", "upstream", "inflight", "pullthrough", "push", "api", "app", "cli", "config"},
    "api": {"app", "cli", "config"},
    "app": {"cli"},
}
LIBRARY_HOMES = {
    "aiohttp.web": {"api", "app"},
    "aiohttp.ClientSession": {"upstream", "notify"},  # notify: the webhook sender owns its own session
    "diskcache": {"storage"},
}
MODULES = modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_import_direction(module: str) -> None:
    own = area(module)
    for imported in imports(MODULES[module]):
        if imported.startswith("mirror."):
            target = area(imported)
            assert target not in FORBIDDEN.get(own, set()), f"{module} imports {imported}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_libraries_stay_in_their_layer(module: str) -> None:
    own = area(module)
    for imported in imports(MODULES[module]):
        for library, homes in LIBRARY_HOMES.items():
            if imported == library or imported.startswith(library + "."):
                assert own in homes, f"{module} uses {library}, which belongs in {sorted(homes)}"


ROUTER_METHODS = {"add_route", "add_get", "add_post", "add_put", "add_patch", "add_delete", "add_head", "add_static"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_one_route_table(module: str) -> None:
    """Every route is registered in ``api/routes.py``: one table shows every path and route name."""
    for node in ast.walk(MODULES[module]):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ROUTER_METHODS:
            assert module == "mirror.api.routes", f"{module} registers a route ({node.func.attr}, line {node.lineno})"


def test_push_layers_within_the_package() -> None:
    """registry -> uploads -> storage.sessions: the chunk protocol knows nothing of repositories' rules."""
    assert not any(name.startswith("mirror.push.registry") for name in imports(MODULES["mirror.push.uploads"]))
    assert not any(name.startswith("mirror.push") for name in imports(MODULES["mirror.storage.sessions"]))


def test_the_rules_see_the_package() -> None:
    assert {"mirror.app", "mirror.pullthrough", "mirror.storage.blobs", "mirror.oci.reference"} <= set(MODULES)
    assert {"mirror.push.registry", "mirror.push.uploads", "mirror.storage.sessions", "mirror.api.referrers"} <= set(
        MODULES
    )
    assert "mirror.storage.blobs" in imports(MODULES["mirror.pullthrough"]) or "mirror.storage.base" in imports(
        MODULES["mirror.pullthrough"]
    )
