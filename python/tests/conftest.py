"""Fixtures: an in-process Store and a real kvstored on loopback.

KVS_KVSTORED names the daemon binary (CTest sets it to build/server/kvstored).
"""
import os
import signal
import subprocess
import tempfile
import time

import pytest

import kvstore

TOKEN = "py-test-token"


@pytest.fixture
def store():
    with kvstore.Store(deterministic=True, n_threads=2) as s:
        yield s


class Daemon:
    def __init__(self, binary):
        self.dir = tempfile.mkdtemp(prefix="kvs-py-test-")
        self.sock = os.path.join(self.dir, "sock")
        port_file = os.path.join(self.dir, "port")
        self.log = open(os.path.join(self.dir, "log"), "wb")
        env = dict(os.environ, KVSTORED_AUTH_TOKEN=TOKEN)
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", "0", "--http-port", "0",
             "--port-file", port_file, "--data-dir", "",
             "--unix-socket", self.sock, "--workers", "2",
             "--engine-threads", "1", "--build-threads", "1",
             "--deterministic", "yes", "--log-level", "warn"],
            stdout=self.log, stderr=self.log, env=env)
        deadline = time.monotonic() + 10
        self.port = None
        while time.monotonic() < deadline and self.port is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvstored exited: {self.read_log()}")
            try:
                with open(port_file) as f:
                    for line in f:
                        key, _, val = line.partition(" ")
                        if key == "port":
                            self.port = int(val)
            except FileNotFoundError:
                time.sleep(0.01)
        if self.port is None:
            self.stop()
            raise RuntimeError("kvstored did not write its port file")
        self.addr = f"tcp://127.0.0.1:{self.port}"

    def read_log(self):
        with open(os.path.join(self.dir, "log"), "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait()
        else:
            rc = self.proc.returncode
        self.log.close()
        self.final_log = self.read_log()
        subprocess.run(["rm", "-rf", self.dir], check=False)
        return rc


@pytest.fixture(scope="module")
def daemon():
    binary = os.environ.get("KVS_KVSTORED")
    if not binary or not os.access(binary, os.X_OK):
        pytest.fail("KVS_KVSTORED must name the kvstored binary "
                    "(CTest sets it)")
    d = Daemon(binary)
    yield d
    rc = d.stop()
    assert rc == 0, (f"kvstored did not exit cleanly on SIGTERM ({rc}): "
                     f"{d.final_log[-4000:]}")


@pytest.fixture
def client(daemon):
    with kvstore.Client(daemon.addr, token=TOKEN) as c:
        yield c
    # Each test uses its own sequence ids; clean the daemon for the next.
    with kvstore.Client(daemon.addr, token=TOKEN) as c:
        for seq in c.list():
            c.drop(seq)


@pytest.fixture(params=["store", "client"])
def kv(request):
    """Either handle: every surface test runs on both."""
    return request.getfixturevalue(request.param)
