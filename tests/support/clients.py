"""The real clients users have, run privately on this machine (../shared/CLIENTS.md): skopeo, podman, a private
containerd with ``ctr``, and a private dockerd. Each runs in a private mount namespace whose ``/etc/hosts`` points
Docker Hub's names at 127.0.0.1, so a client that falls back to Docker Hub fails on loopback: a passing pull went
through the mirror. Nothing touches the machine's own Docker, containerd or containers configuration.

Also ``CuttingProxy``: a TCP proxy between a client and the mirror that cuts one blob response part-way, the fault
a real server cannot be made to show on demand."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.ops import require

DOCKER_HUB_NAMES = (
    "registry-1.docker.io",
    "index.docker.io",
    "auth.docker.io",
    "registry.docker.io",
    "docker.io",
    "production.cloudflare.docker.com",
)


def run(*argv: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 180) -> str:
    """Run a client command; its combined output (clients print progress on stdout and errors on stderr)."""
    proc = subprocess.run(
        argv, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout, check=False
    )
    output = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n{output}")
    return output


def hosts_file(directory: Path) -> Path:
    """An ``/etc/hosts`` for the clients' private namespace: Docker Hub's names are loopback."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "hosts"
    path.write_text(f"127.0.0.1 localhost {' '.join(DOCKER_HUB_NAMES)}\n::1 localhost\n")
    return path


def private(argv: list[str], hosts: Path, binds: dict[Path, str] | None = None) -> list[str]:
    """``argv`` run in a private mount namespace with ``hosts`` as ``/etc/hosts`` (and more bind mounts)."""
    mounts = [f"mount --bind {hosts} /etc/hosts"] + [f"mount --bind {src} {dst}" for src, dst in (binds or {}).items()]
    script = " && ".join(mounts) + ' && exec "$@"'
    return [require("unshare"), "-m", "--propagation", "private", "sh", "-c", script, "sh", *argv]


_HOSTS: Path | None = None


def default_hosts() -> Path:
    global _HOSTS
    if _HOSTS is None:
        _HOSTS = hosts_file(Path(tempfile.mkdtemp(prefix="mirror-hosts-")))
    return _HOSTS


def skopeo(*args: str, timeout: float = 180) -> str:
    return run(*private([require("skopeo"), *args], default_hosts()), timeout=timeout)


# --- a private dockerd -------------------------------------------------------------------------------------------
@dataclass
class Docker:
    root: Path
    sock: Path
    proc: subprocess.Popen[bytes]
    certs: Path  # this daemon's /etc/docker/certs.d

    def __call__(self, *args: str, check: bool = True, stdin: str | None = None, timeout: float = 300) -> str:
        argv = [require("docker"), "-H", f"unix://{self.sock}", *args]
        env = {**os.environ, "DOCKER_CONFIG": str(self.root / "client")}
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, input=stdin, check=False)
        output = proc.stdout + proc.stderr
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed ({proc.returncode}):\n{output}")
        return output

    def trust(self, host_port: str, ca: Path) -> None:
        """``/etc/docker/certs.d/<host:port>/ca.crt``, inside this daemon's private ``/etc/docker``."""
        (self.certs / host_port).mkdir(parents=True, exist_ok=True)
        shutil.copy(ca, self.certs / host_port / "ca.crt")

    def read_file(self, image: str, path: str) -> bytes:
        """The bytes of ``path`` in ``image``'s unpacked filesystem (a created, never started, container)."""
        output = self("create", "--network", "none", image, "/bin/true")
        container = next(line for line in output.split() if len(line) == 64)  # the ID among warnings
        try:
            out = subprocess.run(
                [require("docker"), "-H", f"unix://{self.sock}", "cp", f"{container}:{path}", "-"],
                capture_output=True, timeout=120, check=True,
            )  # fmt: skip
        finally:
            self("rm", container)
        with tarfile.open(fileobj=io.BytesIO(out.stdout)) as tar:
            member = tar.extractfile(tar.getmembers()[0])
            assert member is not None
            return member.read()

    def stop(self) -> None:
        stop_process(self.proc)


def start_dockerd(root: Path, mirror: str | None = None) -> Docker:
    """dockerd with its own data root, exec root and socket, in a private mount namespace with its own
    ``/etc/docker`` (certs.d) and ``/etc/hosts``; ``mirror``: its ``--registry-mirror``."""
    dockerd = require("dockerd")
    require("docker")
    etc = root / "etc-docker"
    certs = etc / "certs.d"
    certs.mkdir(parents=True)
    (root / "client").mkdir()
    (root / "daemon.json").write_text("{}")
    sock = root / "docker.sock"
    argv = [
        dockerd, "--config-file", str(root / "daemon.json"), "--data-root", str(root / "data"),
        "--exec-root", str(root / "exec"), "--pidfile", str(root / "docker.pid"), "-H", f"unix://{sock}",
        "--storage-driver", "vfs", "--iptables=false", "--ip6tables=false", "--ip-masq=false", "--ip-forward=false",
        "--bridge=none", "--userland-proxy=false", "--exec-opt", "native.cgroupdriver=cgroupfs",
    ]  # fmt: skip
    if mirror:
        argv += ["--registry-mirror", mirror]
    log = open(root / "dockerd.log", "wb")  # noqa: SIM115 - inherited by the daemon, closed below
    proc = subprocess.Popen(private(argv, hosts_file(root), {etc: "/etc/docker"}), stdout=log, stderr=log)
    log.close()
    docker = Docker(root, sock, proc, certs)
    wait_for_daemon(
        proc, root / "dockerd.log", lambda: sock.exists() and "Server Version" in docker("info", check=False)
    )
    return docker


def wait_for_daemon(proc: subprocess.Popen[bytes], log: Path, ready: Callable[[], bool]) -> None:
    """Wait (60 s at most) until a daemon we started answers; fail with the end of its log otherwise."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args!r} exited:\n{log.read_text()[-3000:]}")
        if ready():
            return
        time.sleep(0.1)  # a starting daemon (another process), polled with a deadline
    stop_process(proc)
    raise AssertionError(f"daemon did not start:\n{log.read_text()[-3000:]}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


# --- a private containerd -----------------------------------------------------------------------------------------
@dataclass
class Containerd:
    root: Path
    sock: Path
    proc: subprocess.Popen[bytes]
    hosts: Path

    namespace: str = "mirror-test"

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> str:
        argv = [require("ctr"), "-a", str(self.sock), "-n", self.namespace, *args]
        return run(*private(argv, self.hosts), check=check, timeout=timeout)

    def mirror_hosts_dir(self, name: str, mirror: str, registries: tuple[str, ...] = ("docker.io",)) -> Path:
        """A ``--hosts-dir`` whose ``hosts.toml`` for each registry lists ``mirror`` (http://host:port) first."""
        certs = self.root / "certs.d" / name
        for registry in registries:
            server = "https://registry-1.docker.io" if registry == "docker.io" else f"https://{registry}"
            (certs / registry).mkdir(parents=True, exist_ok=True)
            (certs / registry / "hosts.toml").write_text(
                f'server = "{server}"\n\n[host."{mirror}"]\n  capabilities = ["pull", "resolve"]\n'
            )
        return certs

    def pull(self, hosts_dir: Path, ref: str, timeout: float = 300) -> str:
        return self.ctr("images", "pull", "--hosts-dir", str(hosts_dir), "--platform", "linux/amd64", ref,
                        timeout=timeout)  # fmt: skip

    def read_file(self, ref: str, path: str) -> bytes:
        """The bytes of ``path`` in the unpacked image (``ctr images mount`` of its snapshot)."""
        target = Path(tempfile.mkdtemp(prefix="ctr-mount-"))
        # Mount and read inside one private namespace: the mount must exist where the file is read.
        script = (
            f"{require('ctr')} -a {self.sock} -n {self.namespace} images mount --platform linux/amd64 {ref} {target} "
            f">/dev/null && cat {target}/{path.lstrip('/')}; status=$?; "
            f"{require('ctr')} -a {self.sock} -n {self.namespace} images unmount {target} >/dev/null; exit $status"
        )
        proc = subprocess.run(private(["sh", "-c", script], self.hosts), capture_output=True, timeout=120, check=False)
        shutil.rmtree(target, ignore_errors=True)
        if proc.returncode != 0:
            raise AssertionError(f"reading {path} from {ref} failed: {proc.stderr.decode()[-2000:]}")
        return proc.stdout

    def stop(self) -> None:
        stop_process(self.proc)


def start_containerd(root: Path) -> Containerd:
    """containerd with its own config, root, state and sockets, the CRI plugin disabled."""
    binary = require("containerd")
    require("ctr")
    root.mkdir(parents=True, exist_ok=True)
    sock = root / "containerd.sock"
    config = root / "config.toml"
    config.write_text(
        f"""version = 2
root = "{root / "root"}"
state = "{root / "state"}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{root / "ttrpc.sock"}"

[debug]
  address = "{root / "debug.sock"}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{root / "opt"}"

# Each namespace keeps its own content, so a pull in a fresh namespace downloads every blob again.
[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "isolated"
"""
    )
    hosts = hosts_file(root)
    log = open(root / "containerd.log", "wb")  # noqa: SIM115 - inherited by the daemon, closed below
    proc = subprocess.Popen(private([binary, "--config", str(config)], hosts), stdout=log, stderr=log)
    log.close()
    daemon = Containerd(root, sock, proc, hosts)
    wait_for_daemon(
        proc, root / "containerd.log", lambda: sock.exists() and "Version" in daemon.ctr("version", check=False)
    )
    return daemon


# --- podman --------------------------------------------------------------------------------------------------------
@dataclass
class Podman:
    root: Path
    runroot: Path  # podman wants a short path here (at most 50 characters)

    def close(self) -> None:
        shutil.rmtree(self.runroot, ignore_errors=True)

    def use_mirror(self, location: str, prefix: str = "docker.io") -> None:
        """A ``registries.conf`` where ``prefix`` is pulled through the mirror ``location`` (may carry a path)."""
        (self.root / "registries.conf").write_text(
            f'unqualified-search-registries = []\n\n[[registry]]\nprefix = "{prefix}"\nlocation = "{prefix}"\n\n'
            f'[[registry.mirror]]\nlocation = "{location}"\ninsecure = true\n'
        )

    def __call__(self, *args: str, check: bool = True) -> str:
        command, *rest = args
        if command in ("pull", "push"):
            rest = ["--signature-policy", str(self.root / "policy.json"), *rest]
        argv = [
            require("podman"), "--root", str(self.root / "storage"), "--runroot", str(self.runroot),
            "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "none", command, *rest,
        ]  # fmt: skip
        env = {
            "CONTAINERS_REGISTRIES_CONF": str(self.root / "registries.conf"),
            "CONTAINERS_CONF": str(self.root / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.root / "storage.conf"),
            "REGISTRY_AUTH_FILE": str(self.root / "auth.json"),
        }
        return run(*private(argv, default_hosts()), env=env, check=check)

    def read_file(self, image: str, path: str) -> bytes:
        container = self("create", image, "/bin/true").strip().splitlines()[-1]
        try:
            target = self.root / "copied"
            shutil.rmtree(target, ignore_errors=True)
            self("cp", f"{container}:{path}", str(target))
            return target.read_bytes()
        finally:
            self("rm", container)


def podman(root: Path) -> Podman:
    root.mkdir(parents=True, exist_ok=True)
    runroot = Path(tempfile.mkdtemp(prefix="podman-run-", dir="/tmp"))
    (root / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    (root / "registries.conf").write_text("unqualified-search-registries = []\n")
    (root / "containers.conf").write_text("")
    (root / "auth.json").write_text("{}")
    (root / "storage.conf").write_text(
        f'[storage]\ndriver = "vfs"\nrunroot = "{runroot}"\ngraphroot = "{root / "storage"}"\n'
    )
    return Podman(root, runroot)


# --- a proxy that cuts a blob download part-way -------------------------------------------------------------------
@dataclass
class CuttingProxy:
    """Listens on a loopback port and forwards to ``target`` (host, port). The first response to a request whose
    request line contains ``cut_path`` is cut after ``cut_after`` body-and-header bytes; later ones pass. Every
    request head the clients sent is kept in ``requests``, so a test can see the ``Range`` of a resumed download."""

    target: tuple[str, int]
    cut_path: str | None = None  # set by a test; None: nothing is cut
    cut_after: int = 0
    requests: list[str] = field(default_factory=list)
    cuts: int = 0

    def __post_init__(self) -> None:
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            armed = threading.Event()
            threading.Thread(target=self._requests, args=(client, upstream, armed), daemon=True).start()
            threading.Thread(target=self._responses, args=(upstream, client, armed), daemon=True).start()

    def _requests(self, src: socket.socket, dst: socket.socket, armed: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
                if head[:8].split(" ")[0] in ("GET", "HEAD"):
                    with self._lock:
                        self.requests.append(head)
                        if self.cuts == 0 and self.cut_path and self.cut_path in head.split("\r\n", 1)[0]:
                            self.cuts = 1
                            armed.set()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src, dst)

    def _responses(self, src: socket.socket, dst: socket.socket, armed: threading.Event) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if armed.is_set():
                    room = self.cut_after - sent
                    if len(data) >= room:
                        dst.sendall(data[:room])
                        break  # cut: both sides are closed below, mid-body
                    sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src, dst)


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
