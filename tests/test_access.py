"""Access control: htpasswd (bcrypt, written by the real ``htpasswd -B``), anonymous pull on or off, pushes and
deletes only with credentials, read-only mode, unauthenticated pushes from loopback only; TLS with
``--tls-cert``/``--tls-key`` on the real ``mirror`` command."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mirror.access import Access, AccessSettings, Action, Htpasswd, HtpasswdError, is_loopback, parse_htpasswd
from mirror.config import ConfigError
from mirror.metrics import Metrics
from mirror.oci import errors
from tests.conftest import MirrorFactory
from tests.support.credentials import basic, make_htpasswd
from tests.support.ops import NO_UPSTREAM, Mirror, require
from tests.support.plain_http import sha256
from tests.support.pushing import error_code, push_image

ROOT = Path(__file__).resolve().parent.parent
ALICE = ("alice", "s3cret pass")


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    return make_htpasswd(tmp_path / "htpasswd", ALICE, ("bob", "other"))


GOOD = basic(*ALICE)
WRONG = basic("alice", "nope")
CASES = [
    # (settings, method, path, headers, status, code, challenge)
    ({}, "GET", "/v2/", {}, 401, "UNAUTHORIZED", True, "GET /v2/ without credentials -> 401 + Basic challenge"),
    ({}, "GET", "/v2/", GOOD, 200, None, False, "GET /v2/ with credentials (docker login) -> 200"),
    ({}, "GET", "/v2/", WRONG, 401, "UNAUTHORIZED", True, "GET /v2/ wrong password -> 401"),
    ({}, "GET", "/v2/", basic("mallory", "x"), 401, "UNAUTHORIZED", True, "GET /v2/ unknown user -> 401"),
    ({}, "GET", "/v2/", {"Authorization": "Basic !!!"}, 401, "UNAUTHORIZED", True, "malformed Basic -> 401"),
    ({}, "GET", "/v2/", {"Authorization": "Bearer abc"}, 401, "UNAUTHORIZED", True, "Bearer token -> 401"),
    ({}, "GET", "/v2/", basic("alice", "x" * 100), 401, "UNAUTHORIZED", True, "password over 72 bytes -> 401"),
    ({}, "GET", "/v2/my/app/manifests/1.0", {}, 200, None, False, "anonymous pull allowed by default -> 200"),
    ({}, "GET", "/v2/my/app/manifests/1.0", basic("", ""), 200, None, False, "empty Basic = anonymous -> 200"),
    ({}, "GET", "/v2/my/app/manifests/1.0", WRONG, 401, "UNAUTHORIZED", True, "pull with wrong password -> 401"),
    ({"anonymous_pull": False}, "GET", "/v2/my/app/manifests/1.0", {}, 401, "UNAUTHORIZED", True,
     "anonymous pull off: pull without credentials -> 401"),
    ({"anonymous_pull": False}, "GET", "/v2/my/app/manifests/1.0", GOOD, 200, None, False,
     "anonymous pull off: pull with credentials -> 200"),
    ({"anonymous_pull": False}, "GET", "/v2/_catalog", {}, 401, "UNAUTHORIZED", True,
     "anonymous pull off: catalog -> 401"),
    ({}, "POST", "/v2/my/app/blobs/uploads/", {}, 401, "UNAUTHORIZED", True, "push without credentials -> 401"),
    ({}, "POST", "/v2/my/app/blobs/uploads/", WRONG, 401, "UNAUTHORIZED", True, "push wrong password -> 401"),
    ({}, "POST", "/v2/my/app/blobs/uploads/", GOOD, 202, None, False, "push with credentials -> 202"),
    ({}, "PUT", "/v2/my/app/manifests/2.0", {}, 401, "UNAUTHORIZED", True, "manifest PUT anonymous -> 401"),
    ({}, "DELETE", "/v2/my/app/manifests/1.0", {}, 401, "UNAUTHORIZED", True, "delete anonymous -> 401"),
    ({}, "DELETE", "/v2/my/app/manifests/1.0", GOOD, 202, None, False, "delete with credentials -> 202"),
    ({"read_only": True}, "POST", "/v2/my/app/blobs/uploads/", GOOD, 405, "UNSUPPORTED", False,
     "read-only: push -> 405 UNSUPPORTED"),
    ({"read_only": True}, "DELETE", "/v2/my/app/manifests/1.0", GOOD, 405, "UNSUPPORTED", False,
     "read-only: delete -> 405 UNSUPPORTED"),
    ({"read_only": True}, "GET", "/v2/my/app/manifests/1.0", {}, 200, None, False, "read-only: pull -> 200"),
    ({}, "GET", "/healthz", {}, 200, None, False, "healthz needs no credentials"),
    ({}, "GET", "/metrics", {}, 200, None, False, "metrics need no credentials"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("settings", "method", "path", "headers", "status", "code", "challenge"),
    [pytest.param(*case[:7], id=case[7]) for case in CASES],
)
async def test_htpasswd_access(
    push_mirror: MirrorFactory,
    tmp_path: Path,
    htpasswd: Path,
    settings: dict[str, Any],
    method: str,
    path: str,
    headers: dict[str, str],
    status: int,
    code: str | None,
    challenge: bool,
) -> None:
    data_dir = tmp_path / "data"
    setup = await push_mirror(data_dir=data_dir, htpasswd=htpasswd)
    await push_image(setup, "my/app", "1.0", [b"layer"], headers=GOOD)
    await setup.close()
    client = await push_mirror(data_dir=data_dir, htpasswd=htpasswd, **settings)
    body = b"{}" if method == "PUT" else b""
    resp = await client.request(method, path, headers=headers, data=body)
    assert resp.status == status, await resp.text()
    if code is not None:
        assert await error_code(resp) == code
    assert (resp.headers.get("WWW-Authenticate") == 'Basic realm="mirror"') is challenge


async def test_refused_push_leaves_nothing_behind(push_mirror: MirrorFactory, tmp_path: Path, htpasswd: Path) -> None:
    data_dir = tmp_path / "data"
    client = await push_mirror(data_dir=data_dir, htpasswd=htpasswd)
    data = b"secret layer"
    for headers in ({}, WRONG):
        resp = await client.post(f"/v2/my/app/blobs/uploads/?digest={sha256(data)}", data=data, headers=headers)
        assert resp.status == 401
        assert (await client.post("/v2/my/app/blobs/uploads/", headers=headers)).status == 401
    assert not list((data_dir / "uploads").iterdir())
    assert not list((data_dir / "tmp").iterdir())
    assert not (data_dir / "blobs" / "sha256").exists() or not list((data_dir / "blobs" / "sha256").rglob("*"))
    assert (await (await client.get("/v2/_catalog")).json())["repositories"] == []


@pytest.mark.parametrize(
    ("mode", "peer", "allowed"),
    [
        pytest.param("loopback", "127.0.0.1", True, id="loopback mode: 127.0.0.1 may push"),
        pytest.param("loopback", "::1", True, id="loopback mode: ::1 may push"),
        pytest.param("loopback", "::ffff:127.0.0.1", True, id="loopback mode: v4-mapped loopback may push"),
        pytest.param("loopback", "10.1.2.3", False, id="loopback mode: a network client -> 403 DENIED"),
        pytest.param("loopback", None, False, id="loopback mode: unknown peer -> 403 DENIED"),
        pytest.param("any", "10.1.2.3", True, id="any: a network client may push"),
        pytest.param("off", "127.0.0.1", False, id="off: nobody may push without htpasswd"),
    ],
)
async def test_unauthenticated_pushes(mode: str, peer: str | None, allowed: bool) -> None:
    access = Access(AccessSettings(anonymous_push=mode), None, Metrics())
    assert await access.check(Action.PULL, None, peer) is None  # pulls are always open without htpasswd
    for action in (Action.PUSH, Action.DELETE):
        if allowed:
            assert await access.check(action, None, peer) is None
        else:
            with pytest.raises(errors.Denied):
                await access.check(action, None, peer)


async def test_anonymous_push_off_over_http(push_mirror: MirrorFactory) -> None:
    client = await push_mirror(anonymous_push="off")
    resp = await client.post("/v2/my/app/blobs/uploads/")
    assert resp.status == 403
    assert await error_code(resp) == "DENIED"


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True), ("10.0.0.1", False),
     ("::ffff:10.0.0.1", False), ("fe80::1%eth0", False), ("", False), (None, False), ("garbage", False)],
)  # fmt: skip
def test_is_loopback(peer: str | None, loopback: bool) -> None:
    assert is_loopback(peer) is loopback


def test_only_bcrypt_entries_are_used(caplog: pytest.LogCaptureFixture) -> None:
    text = "# comment\n\nalice:$2y$05$abcdefghijklmnopqrstuu5Ryx6ORt5iqyG9zTvXQ9IRwAu/kFGTS\nbob:$apr1$x$y\nbroken\n"
    users = parse_htpasswd(text)
    assert list(users) == ["alice"]
    assert "recreate it with htpasswd -B" in caplog.text


def test_htpasswd_without_usable_entries_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_text("bob:{SHA}abc\n")
    with pytest.raises(HtpasswdError):
        Htpasswd(path)
    from mirror.app import create_app
    from tests.support.pushing import mirror_config

    with pytest.raises(ConfigError, match="no bcrypt entries"):
        create_app(mirror_config(tmp_path / "data", "http://127.0.0.1:9", htpasswd=path))
    with pytest.raises(ConfigError, match="cannot read"):
        create_app(mirror_config(tmp_path / "data", "http://127.0.0.1:9", htpasswd=tmp_path / "missing"))


async def test_htpasswd_is_reread_when_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, htpasswd: Path
) -> None:
    monkeypatch.setattr("mirror.credentials.RELOAD_INTERVAL", 0.0)
    users = Htpasswd(htpasswd)
    assert await users.verify(*ALICE)
    assert not await users.verify("carol", "new")
    make_htpasswd(htpasswd, ("carol", "new"))
    stat = await asyncio.to_thread(htpasswd.stat)
    os.utime(htpasswd, (stat.st_atime, stat.st_mtime + 5))  # a changed mtime, even within one clock tick
    assert await users.verify("carol", "new")


async def test_verified_passwords_skip_bcrypt(monkeypatch: pytest.MonkeyPatch, htpasswd: Path) -> None:
    import bcrypt

    calls = 0
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        nonlocal calls
        calls += 1
        return real(password, hashed)

    monkeypatch.setattr("mirror.credentials.bcrypt.checkpw", counting)
    users = Htpasswd(htpasswd)
    for _ in range(5):
        assert await users.verify(*ALICE)
    assert calls == 1
    assert not await users.verify("alice", "wrong")
    assert not await users.verify("alice", "wrong")
    assert calls == 3  # failures are never remembered


# --- TLS on the real command -------------------------------------------------------------------------------------
def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, made with the real openssl."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [require("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", str(key),
         "-out", str(cert), "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_with_htpasswd_on_the_mirror_command(tmp_path: Path, htpasswd: Path) -> None:
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(cafile=str(cert))
    flags = ("--htpasswd", str(htpasswd), "--tls-cert", str(cert), "--tls-key", str(key))
    mirror = Mirror(tmp_path / "data", NO_UPSTREAM, *flags, ca=cert)
    base = mirror.url
    with mirror:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/v2/", ssl=context) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"] == 'Basic realm="mirror"'
            async with session.get(f"{base}/v2/", ssl=context, headers=GOOD) as resp:
                assert resp.status == 200
            data = b"over tls"
            url = f"{base}/v2/my/app/blobs/uploads/?digest={sha256(data)}"
            async with session.post(url, data=data, ssl=context, headers=GOOD) as resp:
                assert resp.status == 201
            async with session.get(f"{base}/v2/my/app/blobs/{sha256(data)}", ssl=context) as resp:
                assert await resp.read() == data
            with pytest.raises(aiohttp.ClientConnectorCertificateError):  # not trusted without the CA
                await session.get(f"{base}/v2/", ssl=ssl.create_default_context())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--tls-cert", "c.pem"], "go together", id="--tls-cert without --tls-key -> exit 2"),
        pytest.param(["--tls-cert", "missing.pem", "--tls-key", "missing.key"], "cannot load",
                     id="unreadable certificate -> exit 2"),
        pytest.param(["--htpasswd", "missing"], "cannot read htpasswd", id="missing htpasswd -> exit 2"),
    ],
)  # fmt: skip
def test_bad_tls_and_auth_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    from mirror.cli import main

    assert main(["serve", "--data-dir", str(tmp_path / "data"), "--listen", "127.0.0.1:1", *argv]) == 2
    assert message in capsys.readouterr().err
