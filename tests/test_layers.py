"""The import direction of STYLE.md, checked by walking every module's imports.

cli -> app -> api -> (pull, push, admin) -> content -> (storage, upstream) -> oci; ``oci``, ``metrics``,
``config`` and ``log`` import nothing from the package; ``storage`` and ``upstream`` never import each other;
``aiohttp.web`` only in ``api/`` and ``app``; ``ClientSession`` only in ``upstream/``; ``diskcache`` only in
``storage/``; only ``app`` and ``cli`` read ``Config``. ``storage`` never imports ``aiohttp.web``; eviction, the
housekeeper, gc and the admin commands reach content files only through the store's protocol
(``storage.base.BlobStorage``), never with ``os``/``open``/``pathlib`` themselves. ``api`` reaches the store only
through the protocols of ``storage.base`` (and its error types). Inside ``pull``, the coordination seam
(``pull.inflight``) depends on nothing but ``oci``, so another implementation can replace it; the miss path
(``pull.blobs``) never reaches up into the service. Routes are registered in ``api/routes.py``
only. The name router (``routing``) and the access policy (``access``, with ``credentials`` and ``permissions``)
import only the protocol's vocabulary; names are read (host prefix, ``library/``) by the router only, and the
route -> action table is policy, kept out of the HTTP layer.
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


SERVICES = {"content", "pull", "push", "admin"}
FORBIDDEN: dict[str, set[str]] = {
    "oci": {"storage", "upstream", *SERVICES, "api", "app", "cli", "config"},
    "metrics": {"oci", "storage", "upstream", *SERVICES, "api", "app", "cli", "config"},
    "config": {"storage", "upstream", *SERVICES, "api", "app", "cli", "metrics"},
    "log": {"storage", "upstream", *SERVICES, "api", "app", "cli", "config"},
    "storage": {"upstream", *SERVICES, "api", "app", "cli", "config"},
    "upstream": {"storage", *SERVICES, "api", "app", "cli", "config"},
    "content": {"storage", "push", "admin", "api", "app", "cli", "config"},
    "pull": {"push", "admin", "api", "app", "cli", "config"},
    # push/ (local repositories, the chunk protocol) sees stored content and the protocol only: never the HTTP
    # layer, the pull side's package, who may push (access), the webhooks or the admin commands.
    "push": {
        "api",
        "app",
        "cli",
        "config",
        "pull",
        "admin",
        "access",
        "credentials",
        "permissions",
        "notify",
        "routing",
    },
    "admin": {"api", "app", "cli", "config"},
    # What the web page's repository pages show (``mirror.browse``): stored content only, like admin.
    "browse": {"api", "app", "cli", "config", "upstream", "pull", "push", "access", "routing"},
    "access": {"storage", "upstream", *SERVICES, "api", "app", "cli", "config", "routing"},
    "credentials": {"storage", "upstream", *SERVICES, "api", "app", "cli", "config", "access"},
    "permissions": {"storage", "upstream", *SERVICES, "api", "app", "cli", "config", "access"},
    "routing": {"storage", "upstream", *SERVICES, "api", "app", "cli", "config", "access"},
    "notify": {"storage", "upstream", *SERVICES, "api", "app", "cli", "config"},
    "api": {"app", "cli", "config"},
    "app": {"cli"},
    "workers": {"cli"},  # the process supervisor, beside the composition root: it builds an app per worker
    "backends": {"cli", "app", "workers"},  # what the composition root picks the store, index and coordinator from
}
for _banned in FORBIDDEN.values():
    if "app" in _banned:
        _banned.update({"workers", "backends", "housekeeping"})
# The housekeeper and admin logic over a store, for serve and the CLI: built from what backends picks.
FORBIDDEN["housekeeping"] = {"cli", "app", "workers"}
# Finer rules inside an area: module -> the modules (and their submodules) it may not import.
MODULE_FORBIDDEN: dict[str, set[str]] = {
    # The coordination seam: a file-lock or Redis-lease implementation must be able to replace it alone.
    "mirror.pull.inflight": {"mirror.pull", "mirror.storage", "mirror.upstream", "mirror.content", "mirror.metrics"},
    # Its file-lock implementation: the seam, oci and the store's lock files (storage.fetchlocks), nothing more.
    "mirror.pull.filelock": {
        "mirror.pull.service",
        "mirror.pull.blobs",
        "mirror.upstream",
        "mirror.content",
        "mirror.metrics",
    },
    # Its Redis-lease implementation: the seam, the leases (storage.leases) and the peer client, never the miss
    # path or the service (the fetch itself is the FetchRun it is handed).
    "mirror.pull.leases": {"mirror.pull.service", "mirror.pull.blobs", "mirror.pull.filelock", "mirror.content"},
    # The replicas' endpoint serves a held fetch through the seam and the streaming of a growing file only.
    "mirror.api.peer": {"mirror.storage", "mirror.pull.leases", "mirror.pull.service"},
    "mirror.pull.failures": {"mirror.pull"},
    # The host-wide (multiprocess) mode sits on top of the collectors, which know nothing of it.
    "mirror.metrics.collectors": {"mirror.metrics.host"},
    # Continuing an interrupted fetch: the answer and the writer only, never the service, the miss path or a store.
    "mirror.pull.resume": {"mirror.pull", "mirror.content", "mirror.storage.blobs", "mirror.upstream.client"},
    # The quota window and its shared-record protocol: the record (``storage.quotas``) plugs in from the root.
    "mirror.upstream.quota": {"mirror.upstream.client", "mirror.metrics", "mirror.oci"},
    # Processes sharing a data dir: the journal and the locks are leaves of the storage area.
    "mirror.storage.journal": {"mirror.storage.usage", "mirror.storage.housekeeper"},
    "mirror.storage.evictlock": {"mirror.storage.usage", "mirror.storage.housekeeper", "mirror.storage.blobs"},
    "mirror.storage.sessionlocks": {"mirror.storage.sessions", "mirror.storage.blobs"},
    "mirror.pull.blobs": {"mirror.pull.service"},
}
# What ``api`` may import from ``storage``: the protocols, and error types the middleware renders.
API_FROM_STORAGE = {
    "mirror.storage.base": None,  # anything
    "mirror.storage.writer": {"DiskFull"},
    "mirror.storage.usage": {"Usage"},  # the lease table behind USAGE; to go behind a storage.base protocol
}
LIBRARY_HOMES = {
    "aiohttp.web": {"api", "app", "workers", "backends"},
    "gunicorn": {"workers"},
    "aiohttp.ClientSession": {"upstream", "notify"},  # notify: the webhook sender owns its own session
    "diskcache": {"storage"},
    "aiobotocore": {"storage"},  # the S3 clients (storage/s3.py)
    "botocore": {"storage"},
    "redis": {"storage"},  # the replicas' Redis (storage/cluster.py, leases.py, redisindex.py, members.py)
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


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if any(m == k or m.startswith(k + ".") for k in MODULE_FORBIDDEN))
)
def test_import_direction_inside_an_area(module: str) -> None:
    forbidden = next(v for k, v in MODULE_FORBIDDEN.items() if module == k or module.startswith(k + "."))
    for imported in imports(MODULES[module]):
        for target in forbidden:
            assert not (imported == target or imported.startswith(target + ".")), f"{module} imports {imported}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if area(m) == "api"))
def test_api_reaches_the_store_only_through_its_protocols(module: str) -> None:
    for node in ast.walk(MODULES[module]):
        found: list[tuple[str, str | None]]
        if isinstance(node, ast.Import):
            found = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found = [(node.module, alias.name) for alias in node.names]
        else:
            continue
        for source, name in found:
            if not source.startswith("mirror.storage"):
                continue
            assert source in API_FROM_STORAGE, f"{module} imports {source}: use the storage.base protocols"
            allowed = API_FROM_STORAGE[source]
            assert allowed is None or name in allowed, f"{module} imports {source}.{name}: a storage internal"


def test_the_rules_see_the_package() -> None:
    expected = {"mirror.app", "mirror.pull.service", "mirror.pull.blobs", "mirror.pull.inflight", "mirror.content"}
    assert expected | {"mirror.storage.blobs", "mirror.oci.reference"} <= set(MODULES)
    assert "mirror.storage.base" in imports(MODULES["mirror.pull.blobs"])
    assert "mirror.pull.inflight.FetchCoordinator" in imports(MODULES["mirror.pull.blobs"])
    assert any(m.startswith("mirror.storage") for m in imports(MODULES["mirror.api.keys"]))  # the api rule sees
    assert {"mirror.push.registry", "mirror.push.uploads", "mirror.storage.sessions", "mirror.api.referrers"} <= set(
        MODULES
    )


def test_storage_never_imports_aiohttp_web() -> None:
    for module, tree in MODULES.items():
        if area(module) == "storage":
            assert not any(i == "aiohttp.web" or i.startswith("aiohttp.web.") for i in imports(tree)), module


# Modules that must reach content through the store's interface, so that an object-storage ``BlobStorage`` can
# replace the disk without touching them. Import walking cannot see every file access, so this checks what it can:
# no file-system module imported, no builtin ``open``, no file-system method called on anything, and the store
# and index taken as their protocols (``storage.base``), never the disk implementations.
THROUGH_THE_STORE = (
    "mirror.storage.eviction",
    "mirror.storage.housekeeper",
    "mirror.storage.gc",
    "mirror.admin",
    "mirror.pull.resume",
)
FILE_MODULES = {"os", "os.path", "shutil", "pathlib", "io", "tempfile", "glob"}
FILE_METHODS = {
    "unlink", "remove", "rename", "rmdir", "rmtree", "mkdir", "makedirs", "scandir", "listdir", "iterdir", "walk",
    "stat", "lstat", "open", "read_bytes", "read_text", "write_bytes", "write_text", "glob", "rglob", "touch",
    "exists", "is_file", "is_dir", "statvfs", "fsync", "truncate",
}  # fmt: skip
DISK_IMPLEMENTATIONS = {"mirror.storage.blobs.BlobStore", "mirror.storage.index.Index"}


def file_calls(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id == "open":
                found.add("open()")
            elif isinstance(func, ast.Attribute) and func.attr in FILE_METHODS:
                found.add(f".{func.attr}()")
    return found


@pytest.mark.parametrize("module", ["mirror.pull.inflight", "mirror.pull.filelock"])
def test_fetch_coordinators_leave_file_work_to_the_store(module: str) -> None:
    """The file locks of ``pull.filelock`` are taken, read and removed by ``storage.fetchlocks``."""
    assert file_calls(MODULES[module]) == set(), module
    assert not {"os", "os.path", "shutil", "io", "tempfile", "fcntl"} & imports(MODULES[module]), module


@pytest.mark.parametrize("module", THROUGH_THE_STORE)
def test_content_only_through_the_store(module: str) -> None:
    imported = imports(MODULES[module])
    assert not imported & FILE_MODULES, f"{module} imports {sorted(imported & FILE_MODULES)}"
    assert not file_calls(MODULES[module]), f"{module} touches files: {sorted(file_calls(MODULES[module]))}"
    assert not imported & DISK_IMPLEMENTATIONS, f"{module} takes {sorted(imported & DISK_IMPLEMENTATIONS)}"


def test_the_file_check_sees_file_calls() -> None:
    tree = ast.parse("import os\nos.unlink(p)\nopen(p)\npath.read_bytes()\n")
    assert file_calls(tree) == {".unlink()", "open()", ".read_bytes()"}
    assert "os" in imports(tree)


ROUTER_METHODS = {"add_route", "add_get", "add_post", "add_put", "add_patch", "add_delete", "add_head", "add_static"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_one_route_table(module: str) -> None:
    """Every route is registered in ``api/routes.py``: one table shows every path and route name."""
    for node in ast.walk(MODULES[module]):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ROUTER_METHODS:
            assert module == "mirror.api.routes", f"{module} registers a route ({node.func.attr}, line {node.lineno})"


# Whole areas that may import only these modules of the package (and their submodules): the name router and the
# access policy are pure decisions over the protocol's vocabulary, so a cluster or another front end reuses them.
ONLY_FROM: dict[str, set[str]] = {
    "mirror.routing": {"mirror.oci"},
    "mirror.access": {"mirror.oci", "mirror.metrics", "mirror.credentials", "mirror.permissions"},
    "mirror.credentials": {"mirror.oci"},
    "mirror.permissions": set(),
}


@pytest.mark.parametrize("module", sorted(ONLY_FROM))
def test_routing_and_access_import_only_the_vocabulary(module: str) -> None:
    allowed = ONLY_FROM[module]
    for imported in imports(MODULES[module]):
        if imported.startswith("mirror."):
            assert any(imported == a or imported.startswith(a + ".") for a in allowed), f"{module} imports {imported}"


# Reading a name: the host prefix and Docker Hub's ``library/`` rule are applied by the router only (the push rule
# only asks whether a name starts with a host, to refuse it). Everyone else takes the ``Repo`` it returns.
NAME_RULES = {"mirror.oci.reference.docker_hub_path": {"mirror.routing"}, "mirror.routing.route": {"mirror.routing"}}
NAME_RULES["mirror.oci.reference.looks_like_host"] = {"mirror.routing", "mirror.push.rules"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_names_are_read_by_the_router_only(module: str) -> None:
    for imported in imports(MODULES[module]):
        homes = NAME_RULES.get(imported)
        assert homes is None or module in homes, f"{module} imports {imported}: resolve names through mirror.routing"


def test_the_policy_table_is_not_in_the_http_layer() -> None:
    """Which route does what is policy (``mirror.access.ACTIONS``); ``api.access`` only looks the route up."""
    assert "mirror.access.ACTIONS" in imports(MODULES["mirror.api.access"])
    for module, tree in MODULES.items():
        assigned = {
            t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)
        }
        assert "ACTIONS" not in assigned or module == "mirror.access", f"{module} defines ACTIONS"


def test_push_layers_within_the_package() -> None:
    """registry -> uploads -> storage.sessions: the chunk protocol knows nothing of repositories' rules."""
    assert not any(name.startswith("mirror.push.registry") for name in imports(MODULES["mirror.push.uploads"]))
    assert not any(name.startswith("mirror.push") for name in imports(MODULES["mirror.storage.sessions"]))
