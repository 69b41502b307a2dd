"""Repository permissions (``[[access]]`` rules) and the admin API behind ``--htpasswd``, over a real app with an
htpasswd file written by the real ``htpasswd -B``."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from mirror.config import ConfigError, load
from mirror.permissions import Action, Permissions, Rule, compile_pattern
from tests.conftest import MirrorClient, MirrorFactory
from tests.fakes.registry import FakeRegistry
from tests.support.credentials import basic, make_htpasswd
from tests.support.pushing import error_code, push_image

USERS = {"ci": "ci pass", "alice": "alice pass", "bob": "bob pass", "ops": "ops pass"}
# The README's examples together: CI pushes to ci/*, team A (alice) owns team-a/*, everyone pulls, only CI reads
# private/**, ops runs the admin API.
RULES = tomllib.loads("""
[[access]]
users = ["ci"]
repositories = ["ci/*", "private/**"]
actions = ["pull", "push", "delete"]

[[access]]
users = ["alice"]
repositories = ["team-a/*"]
actions = ["pull", "push", "delete"]

[[access]]
users = ["*", "anonymous"]
repositories = ["private/**"]
actions = []

[[access]]
users = ["*", "anonymous"]
repositories = ["**"]
actions = ["pull"]

[[access]]
users = ["ops"]
actions = ["admin"]
""")["access"]
IMAGES = ("ci/app", "team-a/app", "private/db", "other/tool")


def who(user: str | None) -> dict[str, str]:
    return basic(user, USERS[user]) if user else {}


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    return make_htpasswd(tmp_path / "htpasswd", *USERS.items())


async def ruled_mirror(push_mirror: MirrorFactory, tmp_path: Path, htpasswd: Path, **settings: Any) -> MirrorClient:
    """Images pushed under the built-in policy, then a mirror on the same data dir with ``RULES``."""
    data_dir = tmp_path / "data"
    setup = await push_mirror(data_dir=data_dir, htpasswd=htpasswd)
    for repo in IMAGES:
        await push_image(setup, repo, "1.0", [repo.encode()], headers=who("ops"))
    await setup.close()
    return await push_mirror(data_dir=data_dir, htpasswd=htpasswd, extra={"access": RULES}, **settings)


PULL, PUSH, DELETE = "pull", "push", "delete"
REQUESTS = {
    PULL: ("GET", "/v2/{repo}/manifests/1.0", 200),
    PUSH: ("POST", "/v2/{repo}/blobs/uploads/", 202),
    DELETE: ("DELETE", "/v2/{repo}/manifests/1.0", 202),
}
CASES = [
    # (user, action, repository, allowed)
    ("ci", PUSH, "ci/app", True),
    ("ci", DELETE, "ci/app", True),
    ("ci", PUSH, "ci/new", True),
    ("ci", PUSH, "ci/app/nested", False),  # * stays within one path component
    ("ci", PUSH, "team-a/app", False),
    ("ci", PULL, "team-a/app", True),
    ("ci", PULL, "private/db", True),
    ("ci", PUSH, "private/deep/db", True),  # ** crosses components
    ("alice", PUSH, "team-a/app", True),
    ("alice", DELETE, "team-a/app", True),
    ("alice", PUSH, "ci/app", False),
    ("alice", DELETE, "ci/app", False),
    ("alice", PULL, "ci/app", True),
    ("alice", PULL, "private/db", False),
    ("bob", PULL, "team-a/app", True),
    ("bob", PUSH, "team-a/app", False),
    ("bob", DELETE, "other/tool", False),
    ("bob", PUSH, "bob/app", False),
    ("ops", PUSH, "other/tool", False),  # admin is not a repository grant
    (None, PULL, "ci/app", True),
    (None, PULL, "other/tool", True),
    (None, PULL, "private/db", False),
    (None, PUSH, "ci/app", False),
    (None, DELETE, "team-a/app", False),
]


def case_id(user: str | None, action: str, repo: str, allowed: bool) -> str:
    denied = "401 + challenge" if user is None else "403 DENIED"
    return f"{user or 'anonymous'} {action} {repo} -> {'allowed' if allowed else denied}"


@pytest.mark.parametrize(("user", "action", "repo", "allowed"), [pytest.param(*c, id=case_id(*c)) for c in CASES])
async def test_repository_permissions(
    push_mirror: MirrorFactory,
    tmp_path: Path,
    htpasswd: Path,
    user: str | None,
    action: str,
    repo: str,
    allowed: bool,
) -> None:
    client = await ruled_mirror(push_mirror, tmp_path, htpasswd)
    method, path, status = REQUESTS[action]
    resp = await client.request(method, path.format(repo=repo), headers=who(user))
    if allowed:
        assert resp.status == status, await resp.text()
        return
    assert resp.status == (401 if user is None else 403), await resp.text()
    assert await error_code(resp) == ("UNAUTHORIZED" if user is None else "DENIED")
    assert ("WWW-Authenticate" in resp.headers) is (user is None)


@pytest.mark.parametrize(
    ("user", "listed"),
    [
        pytest.param(None, ["ci/app", "other/tool", "team-a/app"], id="anonymous: _catalog without private/*"),
        pytest.param("bob", ["ci/app", "other/tool", "team-a/app"], id="bob: _catalog without private/*"),
        pytest.param("ci", ["ci/app", "other/tool", "private/db", "team-a/app"], id="ci: _catalog lists private/db"),
    ],
)
async def test_catalog_lists_what_the_caller_may_pull(
    push_mirror: MirrorFactory, tmp_path: Path, htpasswd: Path, user: str | None, listed: list[str]
) -> None:
    client = await ruled_mirror(push_mirror, tmp_path, htpasswd)
    assert (await (await client.get("/v2/_catalog", headers=who(user))).json())["repositories"] == listed
    pages: list[str] = []
    url = "/v2/_catalog?n=1"
    while url:  # pages are cut after the filter: every page is full, none is empty
        resp = await client.get(url, headers=who(user))
        names = (await resp.json())["repositories"]
        assert len(names) == 1
        pages += names
        url = resp.headers.get("Link", "").partition(">")[0].lstrip("<")
    assert pages == listed


async def test_rules_match_the_ns_host_the_client_named(
    push_mirror: MirrorFactory, tmp_path: Path, htpasswd: Path, fake_upstream: tuple[FakeRegistry, Any]
) -> None:
    """containerd's ``/v2/org/app/...?ns=docker.io`` is ``docker.io/org/app`` to the rules."""
    fake, _ = fake_upstream
    fake.add_image("library/alpine", "3.19", [b"alpine layer"])
    rules = [{"users": ["anonymous"], "repositories": ["docker.io/**"], "actions": []}, *RULES]
    client = await push_mirror(htpasswd=htpasswd, extra={"access": rules})
    resp = await client.get("/v2/library/alpine/manifests/3.19?ns=docker.io")
    assert resp.status == 401
    assert await error_code(resp) == "UNAUTHORIZED"
    assert (await client.get("/v2/library/alpine/manifests/3.19?ns=docker.io", headers=who("bob"))).status == 200
    assert (await client.get("/v2/library/alpine/manifests/3.19")).status == 200  # no ns: "library/alpine"


def test_patterns() -> None:
    table = [
        ("ci/*", "ci/app", True),
        ("ci/*", "ci/app/x", False),
        ("ci/*", "ci", False),
        ("team-a/**", "team-a/app/x", True),
        ("team-a/**", "team-a", False),
        ("**", "alpine", True),
        ("app?", "app1", True),
        ("app?", "app/", False),
        ("a.b/*", "aXb/c", False),  # everything but * ** ? is literal
        ("docker.io/library/*", "docker.io/library/alpine", True),
    ]
    assert [(p, n, bool(compile_pattern(p).fullmatch(n))) for p, n, _ in table] == table


def test_builtin_permissions_are_todays_behaviour() -> None:
    default = Permissions.default(anonymous_pull=True)
    for action in (Action.PULL, Action.PUSH, Action.DELETE, Action.ADMIN, Action.PING):
        assert default.allows("anyone", action, "any/repo")
    assert default.allows(None, Action.PULL, "any/repo")
    assert not any(default.allows(None, a, "any/repo") for a in (Action.PUSH, Action.DELETE, Action.ADMIN))
    closed = Permissions.default(anonymous_pull=False)
    assert not closed.allows(None, Action.PULL, "any/repo")
    ruled = Permissions([Rule.of(["anonymous"], ["**"], ["pull"])], anonymous_pull=False)
    assert not ruled.allows(None, Action.PULL, "any/repo")  # anonymous_pull = false wins over the rules


# --- the admin API behind --htpasswd -----------------------------------------------------------------------------
ADMIN_CALLS = [
    ("GET", "/admin/v1/stats", None, 200),
    ("GET", "/admin/v1/ls", None, 200),
    ("GET", "/admin/v1/pins", None, 200),
    ("PUT", "/admin/v1/pins?image=alpine:3.19", None, 200),
    ("DELETE", "/admin/v1/pins?image=alpine:3.19", None, 200),
    ("GET", "/admin/v1/evict", None, 200),
    ("POST", "/admin/v1/evict", None, 200),
    ("POST", "/admin/v1/gc?dry_run=true", None, 200),
    ("POST", "/admin/v1/gc", None, 200),
    ("POST", "/admin/v1/verify", None, 200),
    ("POST", "/admin/v1/prefetch", {"images": ["alpine:3.19"]}, 200),
]
ADMIN_IDS = [f"{method} {path}" for method, path, _, _ in ADMIN_CALLS]


@pytest.fixture
async def admin_mirror(
    push_mirror: MirrorFactory, htpasswd: Path, fake_upstream: tuple[FakeRegistry, Any]
) -> MirrorClient:
    fake, _ = fake_upstream
    fake.add_image("library/alpine", "3.19", [b"alpine layer"])
    return await push_mirror(htpasswd=htpasswd, admin_api=True)


@pytest.mark.parametrize(("method", "path", "body", "status"), ADMIN_CALLS, ids=ADMIN_IDS)
async def test_admin_api_needs_credentials_with_htpasswd(
    admin_mirror: MirrorClient, method: str, path: str, body: Any, status: int
) -> None:
    for headers in ({}, basic("ops", "wrong")):
        resp = await admin_mirror.request(method, path, json=body, headers=headers)
        assert resp.status == 401, await resp.text()
        assert await error_code(resp) == "UNAUTHORIZED"
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="mirror"'
    assert (await admin_mirror.get("/admin/v1/pins", headers=who("ops"))).status == 200
    resp = await admin_mirror.request(method, path, json=body, headers=who("bob"))  # built-in policy: any user
    assert resp.status == status, await resp.text()


@pytest.mark.parametrize(("method", "path", "body", "status"), ADMIN_CALLS, ids=ADMIN_IDS)
async def test_admin_api_follows_the_admin_grant(
    push_mirror: MirrorFactory,
    htpasswd: Path,
    fake_upstream: tuple[FakeRegistry, Any],
    method: str,
    path: str,
    body: Any,
    status: int,
) -> None:
    fake, _ = fake_upstream
    fake.add_image("library/alpine", "3.19", [b"alpine layer"])
    client = await push_mirror(htpasswd=htpasswd, admin_api=True, extra={"access": RULES})
    resp = await client.request(method, path, json=body, headers=who("ci"))
    assert resp.status == 403, await resp.text()
    assert await error_code(resp) == "DENIED"
    resp = await client.request(method, path, json=body, headers=who("ops"))
    assert resp.status == status, await resp.text()


async def test_admin_api_without_htpasswd_stays_open(
    push_mirror: MirrorFactory, fake_upstream: tuple[FakeRegistry, Any]
) -> None:
    """Without --htpasswd there are no users: --admin-api is open to whoever reaches it (README "Admin commands":
    keep it on a private interface)."""
    client = await push_mirror(admin_api=True)
    assert (await client.get("/admin/v1/stats")).status == 200
    assert (await client.post("/admin/v1/gc?dry_run=true")).status == 200


# --- the [[access]] tables in the config file --------------------------------------------------------------------
def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mirror.toml"
    path.write_text(text)
    return str(path)


def test_access_tables_are_read_from_the_config_file(tmp_path: Path, htpasswd: Path) -> None:
    from mirror.config.access import access_rules

    text = f'htpasswd = "{htpasswd}"\n\n[[access]]\nusers = ["ci"]\nrepositories = ["ci/*"]\nactions = ["push"]\n'
    config = load({}, write(tmp_path, text), environ={})
    [rule] = access_rules(config)
    assert (rule.users, rule.repositories, rule.actions) == (("ci",), ("ci/*",), ("push",))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        pytest.param('users = ["ci"]\nrepos = ["x"]\nverbs = ["pull"]', "unknown keys in [[access]] entry 1: repos, verbs",
                     id="unknown keys are named"),
        pytest.param('users = ["ci"]\nrepositories = ["x"]\nactions = ["write"]', "unknown actions write",
                     id="unknown action"),
        pytest.param('repositories = ["x"]\nactions = ["pull"]', "needs users", id="no users"),
        pytest.param('users = ["ci"]\nactions = ["push"]', "names no repositories", id="push without repositories"),
        pytest.param('users = "ci"\nrepositories = ["x"]', "must be a list", id="users not a list"),
    ],
)  # fmt: skip
def test_bad_access_tables(tmp_path: Path, htpasswd: Path, table: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load({}, write(tmp_path, f'htpasswd = "{htpasswd}"\n[[access]]\n{table}\n'), environ={})


def test_access_tables_need_htpasswd(tmp_path: Path) -> None:
    text = '[[access]]\nusers = ["ci"]\nrepositories = ["ci/*"]\nactions = ["push"]\n'
    with pytest.raises(ConfigError, match="need --htpasswd"):
        load({}, write(tmp_path, text), environ={})


def test_the_readme_examples_mean_what_they_say(tmp_path: Path, htpasswd: Path) -> None:
    from mirror.config.access import access_rules

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.partition("### Repository permissions")[2]
    example = section.partition("```toml\n")[2].partition("```")[0]
    config = load({}, write(tmp_path, f'htpasswd = "{htpasswd}"\n{example}'), environ={})
    rules = Permissions([Rule.of(r.users, r.repositories, r.actions) for r in access_rules(config)])
    table = [
        ("ci", Action.PUSH, "ci/app", True),
        ("ci", Action.PUSH, "team-a/app", False),
        ("anna", Action.PUSH, "team-a/app/x", True),
        ("bob", Action.PULL, "team-a/app", True),
        ("bob", Action.PUSH, "team-a/app", False),
        (None, Action.PULL, "library/alpine", True),
        (None, Action.PULL, "secret/db", False),
        ("alice", Action.PULL, "secret/db", False),
        ("ops", Action.ADMIN, None, True),
        ("ci", Action.ADMIN, None, False),
    ]
    assert [(u, a, n, rules.allows(u, a, n)) for u, a, n, _ in table] == table
