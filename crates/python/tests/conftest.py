"""The Python package's tests: real Mosquitto processes on free loopback
ports, started and killed (by PID) by the tests, and the package built by
scripts/python-dev (the README's test command runs it first)."""

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.join(HERE, "..", "..", "..", "target", "python")
sys.path.insert(0, PACKAGE)


def mosquitto_binary():
    for path in ("/usr/sbin/mosquitto", shutil.which("mosquitto")):
        if path and os.access(path, os.X_OK):
            return path
    if os.environ.get("CI") == "true":
        pytest.fail("mosquitto is not installed (the README's test command installs it)")
    pytest.skip("mosquitto is not installed")


def free_port(below_ephemeral=False):
    """A free loopback port. `below_ephemeral`: one no client socket can get
    as its own port, for a broker that is down for a while (a client that
    keeps connecting to a free port in the ephemeral range can connect to
    itself)."""
    if below_ephemeral:
        import random

        for _ in range(200):
            port = random.randint(20000, 32000)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what, cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        time.sleep(0.02)


class Broker:
    """One Mosquitto on 127.0.0.1:PORT; `kill9` and `start` again on the same port."""

    def __init__(self, port=None, persistence=False, tls=None, acl=None):
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="steadfast-py-broker-")
        # Mosquitto started as root writes its persistence as `mosquitto`.
        os.chmod(self.dir, 0o777)
        self.persistence = persistence
        # (ca, cert, key) PEM files: the listener speaks TLS only.
        self.tls = tls
        # The text of an ACL file: what every client may read and write.
        self.acl = acl
        self.proc = None

    @property
    def url(self):
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self):
        conf = os.path.join(self.dir, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n")
            f.write(f"persistence {'true' if self.persistence else 'false'}\n")
            f.write(f"persistence_location {self.dir}/\n")
            if self.tls:
                ca, cert, key = self.tls
                f.write(f"certfile {cert}\nkeyfile {key}\n")
            if self.acl is not None:
                acl = os.path.join(self.dir, "acl")
                with open(acl, "w") as a:
                    a.write(self.acl)
                os.chmod(acl, 0o644)
                f.write(f"acl_file {acl}\n")
        log = open(os.path.join(self.dir, "log"), "a")
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", conf], stdout=log, stderr=log)

        def listening():
            if self.proc.poll() is not None:
                with open(os.path.join(self.dir, "log")) as f:
                    raise AssertionError(f"mosquitto exited with {self.proc.returncode}: {f.read()[-2000:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(f"mosquitto listening on {self.port}", listening)
        return self

    def stop(self):
        """A clean shutdown (SIGTERM): with persistence, sessions and their
        queued messages are written to disk and come back with `start`."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait()
        self.proc = None

    def kill9(self):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def postgres_bin(name):
    """Debian's PostgreSQL program `name` (the newest version installed)."""
    version = lambda d: int(d.split("/")[-2]) if d.split("/")[-2].isdigit() else -1
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version)
    for d in reversed(dirs):
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    if os.environ.get("CI") == "true":
        pytest.fail("PostgreSQL is not installed (the README's test command installs it)")
    pytest.skip("PostgreSQL is not installed")


class Postgres:
    """A PostgreSQL of the test's own: `initdb` into a temporary directory,
    `postgres` on a free loopback port in a process group of its own
    (killed by that group), as the `postgres` user when the tests run as
    root. Never the machine's own server."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="steadfast-py-pg-")
        self.port = free_port()
        self.demote = None
        if os.geteuid() == 0:
            import pwd

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("no `postgres` user to run PostgreSQL as (Debian's postgresql package makes it)")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)

            def demote():
                os.setgroups([])
                os.setgid(pw.pw_gid)
                os.setuid(pw.pw_uid)

            self.demote = demote
        self.proc = None
        try:
            self._start()
        except BaseException:
            self.kill9()
            raise

    def _start(self):
        data = os.path.join(self.dir, "data")
        subprocess.run(
            [postgres_bin("initdb"), "-D", data, "-U", "steadfast", "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True, preexec_fn=self.demote,
        )
        log = open(os.path.join(self.dir, "log"), "a")
        self.proc = subprocess.Popen(
            [postgres_bin("postgres"), "-D", data, "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
             "-c", f"unix_socket_directories={self.dir}", "-c", "max_connections=40", "-c", "shared_buffers=16MB"],
            stdout=log, stderr=log, preexec_fn=self._child,
        )

        def ready():
            if self.proc.poll() is not None:
                with open(os.path.join(self.dir, "log")) as f:
                    raise AssertionError(f"postgres exited with {self.proc.returncode}: {f.read()[-2000:]}")
            probe = [postgres_bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "steadfast"]
            return subprocess.run(probe).returncode == 0

        wait_until(f"postgres accepting connections on {self.port}", ready, timeout=30.0)

    def _child(self):
        os.setpgid(0, 0)
        if self.demote:
            self.demote()

    @property
    def url(self):
        return f"postgres://steadfast@127.0.0.1:{self.port}/postgres"

    def kill9(self):
        """The server and every backend at once (its process group, even
        if the server itself is gone), and its directory."""
        if self.proc:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def postgres():
    pg = Postgres()
    yield pg
    pg.kill9()


@pytest.fixture
def broker():
    b = Broker().start()
    yield b
    b.kill9()


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


def python(script, *args):
    """Runs `script` (Python source) in a child process with the package on its path."""
    env = dict(os.environ, PYTHONPATH=PACKAGE)
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        env=env,
        # Open until the test kills the child (its scripts wait on stdin).
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def certificates():
    """A fresh CA and a server certificate for 127.0.0.1 signed by it
    (openssl), valid for a day: (ca, cert, key) paths, readable by the
    broker (Mosquitto started as root runs as the `mosquitto` user)."""
    dir = tempfile.mkdtemp(prefix="steadfast-py-pki-")
    os.chmod(dir, 0o755)
    run = lambda *a: subprocess.run(["openssl", *a], cwd=dir, check=True, capture_output=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=steadfast test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    with open(os.path.join(dir, "ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "1", "-extfile", "ext")
    files = tuple(os.path.join(dir, f) for f in ("ca.pem", "server.pem", "server.key"))
    for f in files:
        os.chmod(f, 0o644)
    return files


def drain(consumer, n, timeout=30.0):
    """Takes and acks deliveries until `n` distinct payloads came; returns how often each came."""
    seen = {}
    deadline = time.monotonic() + timeout
    while len(seen) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"{len(seen)} of {n} messages within {timeout}s"
        d = consumer.next(timeout=left)
        assert d is not None, f"{len(seen)} of {n} messages within {timeout}s"
        seen[d.payload] = seen.get(d.payload, 0) + 1
        d.ack()
    return seen
