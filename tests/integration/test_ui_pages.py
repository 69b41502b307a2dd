"""The web page's repository, upstream and action pages in a real headless browser (``tests.support.browser``),
against a real mirror in front of a real Distribution upstream after real pulls through it and a push to it.

Every visit fails on a console error, a request to another host or a horizontal overflow, and leaves
screenshots at desktop and phone widths under the test's temp dir. The pull commands the page prints are run
with the real podman."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser

from tests.support.browser import launch, shot, visit
from tests.support.clients import Podman, podman
from tests.support.credentials import basic, make_htpasswd
from tests.support.images import Image, manifest_digest, push_list, push_tar_image, random_files
from tests.support.ops import Mirror, blob_files, run_cli, start_registry, wait_until
from tests.support.plain_http import OCI_MANIFEST, pull, push_blob, sha256

pytestmark = pytest.mark.integration
PUSHED_TAG = "x--y"  # text that a careless renderer would turn into an en dash or a comment


@dataclass
class World:
    upstream: str
    mirror: Mirror
    demo: Image  # docker.io/library/demo:1.0, pulled through
    multi: list[Image]  # docker.io/library/multi:1.0, an index; only its amd64 image pulled
    pushed: Image  # team/app:x--y, pushed to the mirror
    sbom: str  # the digest of an SBOM pushed for it (a referrer)


SBOM = "application/spdx+json"


def push_sbom(registry: str, repo: str, subject: Image) -> str:
    """An OCI 1.1 artifact whose subject is ``subject``: empty config, one layer; its manifest's digest."""
    empty = push_blob(registry, repo, b"{}")
    layer = push_blob(registry, repo, b'{"spdxVersion": "SPDX-2.3"}')
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": SBOM,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
            "layers": [{"mediaType": SBOM, "digest": layer, "size": 27}],
            "subject": {"mediaType": subject.media_type, "digest": subject.manifest, "size": subject.manifest_size},
        }
    ).encode()
    digest = sha256(body)
    request = urllib.request.Request(
        f"{registry}/v2/{repo}/manifests/{digest}", data=body, method="PUT", headers={"Content-Type": OCI_MANIFEST}
    )
    urllib.request.urlopen(request, timeout=10).close()
    return digest


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    yield from launch()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("pages")
    registry, url = start_registry(workdir / "registry")
    try:
        demo = push_tar_image(url, "library/demo", "1.0", [random_files("hello.txt", 20_000)])
        multi = [
            push_tar_image(url, "library/multi", None, [{"arch": arch.encode()}], arch) for arch in ("amd64", "arm64")
        ]
        push_list(url, "library/multi", "1.0", multi)
        with Mirror(workdir / "data", url, "--admin-api") as mirror:
            pull(mirror.url, "demo", "1.0")
            pull(mirror.url, "multi", "1.0")  # the index and its first (amd64) image
            pushed = push_tar_image(mirror.url, "team/app", PUSHED_TAG, [{"pushed.txt": b"pushed here"}])
            sbom = push_sbom(mirror.url, "team/app", pushed)
            yield World(url, mirror, demo, multi, pushed, sbom)
    finally:
        registry.stop()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    made = podman(tmp_path_factory.mktemp("podman"))
    yield made
    made.close()


def status_of(url: str, method: str = "GET", headers: dict[str, str] | None = None, data: bytes | None = None) -> int:
    try:
        request = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
        with urllib.request.urlopen(request, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_list_shows_pulled_and_pushed_repositories_and_searches(
    browser: Browser, world: World, tmp_path: Path
) -> None:
    for shown in visit(browser, world.mirror.url + "/ui/repositories", tmp_path, "repositories"):
        assert shown.status == 200 and not shown.console_errors, shown.console_errors
        rows = shown.page.eval_on_selector_all("#repositories tr", "rows => rows.map(r => r.dataset.repo)")
        assert rows == ["docker.io/library/demo", "docker.io/library/multi", "local/team/app"]
        assert shown.page.text_content('[data-repo="local/team/app"] a') == "team/app"
        assert shown.page.text_content('[data-repo="local/team/app"] .pill') == "pushed"
    for shown in visit(browser, world.mirror.url + "/ui/repositories?q=MULT", tmp_path, "search"):
        rows = shown.page.eval_on_selector_all("#repositories tr", "rows => rows.map(r => r.dataset.repo)")
        assert rows == ["docker.io/library/multi"]  # server-side, case-insensitive


def test_a_search_string_from_the_url_shows_as_text(browser: Browser, world: World, tmp_path: Path) -> None:
    query = '<b id="bold">demo</b><script>console.error("ran")</script>'
    url = world.mirror.url + "/ui/repositories?" + urllib.parse.urlencode({"q": query})
    for shown in visit(browser, url, tmp_path, "search-html"):
        assert shown.status == 200 and not shown.console_errors, shown.console_errors
        assert shown.page.text_content("#query") == query
        assert shown.page.input_value("input[name=q]") == query
        assert shown.page.locator("#bold").count() == 0
        assert shown.page.is_visible("#no-repositories")


def test_the_list_pages_through_the_index(world: World) -> None:
    def names(query: str) -> tuple[list[str], str | None]:
        with urllib.request.urlopen(world.mirror.url + "/ui/repositories?" + query, timeout=10) as resp:
            html = resp.read().decode()
        found = [part.split('"', 1)[0] for part in html.split('data-repo="')[1:]]
        more = html.split('id="next" href="', 1)[1].split('"', 1)[0] if 'id="next"' in html else None
        return found, more

    first, more = names("")
    assert first == ["docker.io/library/demo", "docker.io/library/multi", "local/team/app"] and more is None
    after, _ = names(urllib.parse.urlencode({"after": "docker.io/library/demo"}))
    assert after == ["docker.io/library/multi", "local/team/app"]


def commands_of(world: World, browser: Browser, tmp_path: Path, repo: str, tag: str, name: str) -> dict[str, str]:
    url = f"{world.mirror.url}/ui/repositories/{repo}"
    found: dict[str, str] = {}
    for shown in visit(browser, url, tmp_path, name, permissions=["clipboard-read", "clipboard-write"]):
        assert shown.status == 200 and not shown.console_errors, shown.console_errors
        card = shown.page.locator(f'[data-tag="{tag}"]')
        assert card.locator(".tag").text_content() == tag  # shown as is
        found = dict(
            card.locator("code[data-client]").evaluate_all("els => els.map(e => [e.dataset.client, e.textContent])")
        )
        button = card.locator("button[data-copy]").first
        button.click()  # the copy button works (static/copy.js)...
        assert shown.page.evaluate("navigator.clipboard.readText()") == found["docker"]
        assert button.text_content() == "Copied"
    return found


def test_the_repository_page_lists_tags_with_pull_commands_that_work(
    browser: Browser, world: World, client: Podman, tmp_path: Path
) -> None:
    host = world.mirror.url.removeprefix("http://")
    found = commands_of(world, browser, tmp_path, "docker.io/library/demo", "1.0", "repository")
    assert found == {
        "docker": f"docker pull {host}/library/demo:1.0",
        "podman": f"podman pull --tls-verify=false {host}/library/demo:1.0",
        "ctr": f"ctr image pull --plain-http {host}/library/demo:1.0",
    }
    program, command, *args = found["podman"].split()
    assert (program, command) == ("podman", "pull")
    client(command, *args)  # the printed command, run
    assert client.read_file(args[-1], "/hello.txt") == world.demo.files["hello.txt"]


def test_the_pushed_image_is_listed_with_its_tag_as_text_and_a_working_command(
    browser: Browser, world: World, client: Podman, tmp_path: Path
) -> None:
    found = commands_of(world, browser, tmp_path, "local/team/app", PUSHED_TAG, "pushed")
    program, command, *args = found["podman"].split()
    assert args[-1].endswith(f"/team/app:{PUSHED_TAG}")
    client(command, *args)
    assert client.read_file(args[-1], "/pushed.txt") == b"pushed here"


def test_tags_show_digest_size_platforms_and_the_image_tree(browser: Browser, world: World, tmp_path: Path) -> None:
    url = f"{world.mirror.url}/ui/repositories/docker.io/library/multi"
    index = manifest_digest(world.upstream, "library/multi", "1.0")
    for shown in visit(browser, url, tmp_path, "platforms"):
        card = shown.page.locator('[data-tag="1.0"]')
        assert card.locator("code").first.text_content() == index
        platforms = card.locator("ul.plain li").all_text_contents()
        assert [" ".join(p.split()) for p in platforms] == ["linux/amd64 cached", "linux/arm64 not cached"]
        amd64 = world.multi[0]
        stored = sum(amd64.sizes.values()) + amd64.manifest_size  # the index itself counts too
        size = int(card.locator('[data-stat="size_bytes"]').get_attribute("data-value") or 0)
        assert stored < size < stored + 2_000
        card.locator("dd a").first.click()  # to the image page
        shown.page.wait_for_selector("table.layers")
        layers = shown.page.eval_on_selector_all(
            "table.layers tr[data-layer]", "rows => rows.map(r => [r.dataset.layer, +r.cells[1].dataset.value])"
        )
        assert layers[0] == [amd64.layers[0], amd64.sizes[amd64.layers[0]]]
        assert len(layers) == 1  # the arm64 image is not cached: its layers are not listed
        shot(shown.page, tmp_path, "image")


@pytest.mark.parametrize(
    "path",
    [
        "/ui/repositories/docker.io/library/nothing",
        "/ui/repositories/<b>x</b>",
        "/ui/images/docker.io/library/demo?digest=sha256:nope",
        "/ui/images/docker.io/library/demo?digest=sha256:" + "0" * 64,
        "/ui/repositories/docker.io/library/demo/../../../local/team/app",
    ],
    ids=["unknown repository", "HTML in the name", "bad digest", "unknown digest", "dots in the path"],
)
def test_unknown_repositories_and_images_are_html_404s(world: World, path: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(world.mirror.url + urllib.parse.quote(path, safe="/?=:"), timeout=10)
    assert answer.value.code == 404 and answer.value.headers["Content-Type"].startswith("text/html")
    assert "<b>" not in answer.value.read().decode()


def test_the_image_page_lists_its_referrers(browser: Browser, world: World, tmp_path: Path) -> None:
    url = f"{world.mirror.url}/ui/images/local/team/app?digest={world.pushed.manifest}"
    for shown in visit(browser, url, tmp_path, "referrers"):
        assert shown.status == 200 and not shown.console_errors, shown.console_errors
        rows = shown.page.eval_on_selector_all("#referrers tbody tr", "rows => rows.map(r => r.innerText)")
        assert len(rows) == 1 and world.sbom in rows[0] and SBOM in rows[0]
        shown.page.click("#referrers tbody a")  # to the SBOM's own page, which names its subject
        assert shown.page.text_content("main p:has-text('Refers to') code") == world.pushed.manifest


def test_an_image_of_another_repository_is_not_shown_under_this_one(world: World) -> None:
    """The pushed image's digest asked for under a pulled-through name: 404, as the registry API answers."""
    path = f"/ui/images/docker.io/library/demo?digest={world.pushed.manifest}"
    assert status_of(world.mirror.url + path) == 404
    assert status_of(world.mirror.url + f"/ui/images/local/team/app?digest={world.pushed.manifest}") == 200


def test_the_upstreams_page_shows_url_routing_and_health(browser: Browser, world: World, tmp_path: Path) -> None:
    for shown in visit(browser, world.mirror.url + "/ui/upstreams", tmp_path, "upstreams"):
        assert shown.status == 200 and not shown.console_errors, shown.console_errors
        card = shown.page.locator('[data-upstream="docker.io"]')
        assert card.locator('[data-stat="url"]').text_content() == world.upstream
        assert card.locator(".pill").text_content() == "default"
        assert float(card.locator('[data-stat="last_success"]').get_attribute("data-value") or 0) > 0
        assert card.locator('[data-stat="last_error"]').get_attribute("data-value") == "null"
        assert card.locator('[data-stat="deferred"]').get_attribute("data-value") == "0"
        assert "<path> (bare names: Docker's registry-mirrors)" in (card.locator("ul.routing").text_content() or "")


def test_the_upstreams_page_shows_the_last_failure(browser: Browser, tmp_path: Path) -> None:
    registry, url = start_registry(tmp_path / "registry")
    try:
        with Mirror(tmp_path / "data", url, "--add-upstream", "ghcr.io=http://127.0.0.1:9") as mirror:
            assert status_of(mirror.url + "/v2/ghcr.io/o/a/manifests/1") >= 500
            for shown in visit(browser, mirror.url + "/ui/upstreams", tmp_path, "upstream-down", sizes=("phone",)):
                card = shown.page.locator('[data-upstream="ghcr.io"]')
                assert card.locator('[data-stat="last_success"]').get_attribute("data-value") == "null"
                assert card.locator('[data-stat="last_error_reason"]').text_content()
                assert card.locator('[data-stat="errors"]').get_attribute("data-value") != "0"
    finally:
        registry.stop()


def test_pin_from_the_page_protects_the_image_from_mirror_evict(browser: Browser, world: World, tmp_path: Path) -> None:
    data, config = tmp_path / "data", tmp_path / "mirror.toml"
    config.write_text("[cache]\nflush_interval = 0.2\n")  # the CLI evicts content idle for 2 flushes + 5 s
    with Mirror(data, world.upstream, "--admin-api", "--config", str(config)) as mirror:
        pull(mirror.url, "demo", "1.0")
        pull(mirror.url, "multi", "1.0")
        for shown in visit(browser, mirror.url + "/ui/repositories/docker.io/library/demo", tmp_path, "pin"):
            page = shown.page
            if page.locator('[data-tag="1.0"] [data-stat="pinned"]').get_attribute("data-value") == "true":
                continue  # pinned at the first width already
            page.click('[data-tag="1.0"] a.button:text("Pin")')
            assert "docker.io/library/demo:1.0" in (page.text_content("#question") or "")
            page.click("#confirm")
            assert page.text_content("#outcome") == "Pinned docker.io/library/demo:1.0."
            page.goto(mirror.url + "/ui/repositories/docker.io/library/demo")
            assert page.get_attribute('[data-tag="1.0"] [data-stat="pinned"]', "data-value") == "true"
            assert not shown.console_errors, shown.console_errors
        evict = ("evict", "--data-dir", str(data), "--config", str(config), "--cache-size", "1KiB")

        def unpinned_gone() -> bool:
            run_cli(*evict)
            return world.multi[0].layers[0] not in blob_files(data)

        wait_until(unpinned_gone, what="the image that is not pinned evicted by mirror evict")
        assert set(world.demo.blobs) <= set(blob_files(data))  # the pinned one stayed


def test_actions_need_the_admin_api(world: World, tmp_path: Path) -> None:
    with Mirror(tmp_path / "data", world.upstream) as mirror:
        assert status_of(mirror.url + "/ui/actions/") == 404
        assert status_of(mirror.url + "/ui/actions/evict", "POST", data=b"") == 404
        with urllib.request.urlopen(mirror.url + "/ui/repositories", timeout=10) as resp:
            assert "/ui/actions/" not in resp.read().decode()


def test_with_htpasswd_the_actions_need_credentials(browser: Browser, world: World, tmp_path: Path) -> None:
    htpasswd = make_htpasswd(tmp_path / "htpasswd", ("ops", "s3cret"))
    with Mirror(tmp_path / "data", world.upstream, "--admin-api", "--htpasswd", str(htpasswd)) as mirror:
        pull(mirror.url, "demo", "1.0")
        page_url = mirror.url + "/ui/repositories/docker.io/library/demo"
        for shown in visit(browser, page_url, tmp_path, "anonymous", sizes=("phone",)):
            assert shown.status == 200  # anonymous pull is on: the pages are open...
            assert shown.page.locator("a.button").count() == 0  # ...the actions are not offered...
            assert shown.page.is_visible("#login")  # ...but a login is
        form = urllib.parse.urlencode({"image": "demo:1.0", "token": "x"}).encode()
        assert status_of(mirror.url + "/ui/actions/") == 401
        assert status_of(mirror.url + "/ui/actions/pin", "POST", data=form) == 401
        assert status_of(mirror.url + "/ui/actions/pin", "POST", basic("ops", "wrong"), form) == 401
        assert status_of(mirror.url + "/ui/actions/pin", "POST", basic("ops", "s3cret"), form) == 403  # no token
        credentials = {"username": "ops", "password": "s3cret"}
        login = mirror.url + "/ui/login?" + urllib.parse.urlencode({"next": "/ui/repositories/docker.io/library/demo"})
        for shown in visit(browser, login, tmp_path, "admin", sizes=("phone",), http_credentials=credentials):
            assert shown.page.url == page_url  # logged in, and back
            shown.page.click('[data-tag="1.0"] a.button:text("Pin")')
            shown.page.click("#confirm")
            assert shown.page.text_content("#outcome") == "Pinned docker.io/library/demo:1.0."
        request = urllib.request.Request(mirror.url + "/admin/v1/pins", headers=basic("ops", "s3cret"))
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert json.load(resp)["pins"] == ["docker.io/library/demo:1.0"]


def test_a_post_from_another_site_is_refused(world: World) -> None:
    """Without --htpasswd anyone may act, but only from the page: a form posted by another site has no token, and
    one with the token but another Origin is refused too."""
    url = world.mirror.url
    with urllib.request.urlopen(url + "/ui/actions/pin?image=demo:1.0", timeout=10) as resp:
        token = resp.read().decode().split('name="token" value="', 1)[1].split('"', 1)[0]
    form = urllib.parse.urlencode({"image": "demo:1.0", "token": token}).encode()
    assert status_of(url + "/ui/actions/pin", "POST", {"Origin": "http://evil.example"}, form) == 403
    assert status_of(url + "/ui/actions/pin", "POST", {}, urllib.parse.urlencode({"image": "demo:1.0"}).encode()) == 403
    pins = json.load(urllib.request.urlopen(url + "/admin/v1/pins", timeout=10))
    assert "docker.io/library/demo:1.0" not in pins["pins"]
    assert status_of(url + "/ui/actions/unpin", "POST", {"Origin": url}, form) == 200  # the page's own form


def test_evict_gc_and_prefetch_from_the_page(browser: Browser, world: World, tmp_path: Path) -> None:
    with Mirror(tmp_path / "data", world.upstream, "--admin-api") as mirror:
        for shown in visit(browser, mirror.url + "/ui/actions/", tmp_path, "actions"):
            page = shown.page
            page.fill("input[name=image]:near(:text('Prefetch an image'))", "demo:1.0")
            page.click("button:text('Prefetch…')")
            assert "docker.io/library/demo:1.0" in (page.text_content("#question") or "")
            shot(page, tmp_path, "confirm")
            page.click("#confirm")
            page.wait_for_selector('#job[data-state="done"]', timeout=30_000)  # live, from static/job.js
            shot(page, tmp_path, "job")
            assert page.get_attribute("#progress", "value") == page.get_attribute("#progress", "max")
            assert "Cached 2 blobs" in (page.text_content("#outcome") or "")
            page.goto(mirror.url + "/ui/actions/")
            page.click("#gc")
            page.click("#confirm")
            assert "nothing was removed" in (page.text_content("#outcome") or "")
            shot(page, tmp_path, "done")
            page.goto(mirror.url + "/ui/actions/")
            page.click("#evict")
            assert "removes 0 entries" in (page.text_content("#question") or "")  # no --cache-size: nothing to do
            page.click("#confirm")
            assert (page.text_content("#outcome") or "").startswith("Evicted 0 entries")
            assert not shown.console_errors, shown.console_errors
        assert set(world.demo.blobs) <= set(blob_files(tmp_path / "data"))
        names = {p.name for p in tmp_path.glob("*.png")}
        assert {f"{n}-{w}.png" for n in ("actions", "confirm", "job", "done") for w in ("desktop", "phone")} <= names


def listed(url: str, headers: dict[str, str] | None = None) -> list[str]:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as resp:
        html = resp.read().decode()
    return [part.split('"', 1)[0] for part in html.split('data-repo="')[1:]]


def test_a_pushed_repository_is_shown_only_to_callers_who_may_pull_it(world: World, tmp_path: Path) -> None:
    data = tmp_path / "data"
    with Mirror(data, world.upstream) as open_mirror:  # pushed under the built-in policy (loopback may push)
        push_tar_image(open_mirror.url, "private/db", "1", [{"db": b"secret"}])
        pull(open_mirror.url, "demo", "1.0")
    htpasswd = make_htpasswd(tmp_path / "htpasswd", ("ci", "ci pass"), ("bob", "bob pass"))
    config = tmp_path / "mirror.toml"
    config.write_text(
        '[[access]]\nusers = ["ci"]\nrepositories = ["private/**"]\nactions = ["pull"]\n\n'
        '[[access]]\nusers = ["*", "anonymous"]\nrepositories = ["private/**"]\nactions = []\n\n'
        '[[access]]\nusers = ["*", "anonymous"]\nrepositories = ["**"]\nactions = ["pull"]\n'
    )
    flags = ("--htpasswd", str(htpasswd), "--config", str(config))
    with Mirror(data, world.upstream, *flags) as mirror:
        page = mirror.url + "/ui/repositories/local/private/db"
        for who in (None, basic("bob", "bob pass")):
            assert listed(mirror.url + "/ui/repositories", who) == ["docker.io/library/demo"]
            assert listed(mirror.url + "/ui/repositories?q=private", who) == []
            assert status_of(page, headers=who) == 404  # the same answer as a name that does not exist
        ci = basic("ci", "ci pass")
        assert listed(mirror.url + "/ui/repositories", ci) == ["docker.io/library/demo", "local/private/db"]
        assert status_of(page, headers=ci) == 200
