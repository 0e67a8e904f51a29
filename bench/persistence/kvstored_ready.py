#!/usr/bin/env python3
"""kvstored_ready.py KVSTORED DATA_DIR [LOAD...]: seconds from starting
kvstored on DATA_DIR to its systemd READY=1 (one datagram on
$NOTIFY_SOCKET, server/server.c), per --load mode (default: warm lazy
eager). Loopback only (127.0.0.1, ports picked by the kernel); the daemon
is stopped with SIGTERM after READY, and killed if it is not ready within
600 s. The page cache is dropped before each start where allowed (root);
the output says whether it was. Prints one JSON object per mode."""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time


def drop_caches():
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def ready_s(kvstored, data_dir, load):
    tmp = tempfile.mkdtemp(prefix="kvs-ready-")
    path = os.path.join(tmp, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(600)
    dropped = drop_caches()
    env = dict(os.environ, NOTIFY_SOCKET=path)
    t0 = time.monotonic()
    p = subprocess.Popen([kvstored, "--data-dir", data_dir, "--load", load,
                          "--bind", "127.0.0.1", "--port", "0",
                          "--http-port", "0", "--log-level", "warn"],
                         env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    took = None
    try:
        while True:
            msg = sock.recv(4096).decode(errors="replace")
            if "READY=1" in msg:
                took = time.monotonic() - t0
                break
    except socket.timeout:
        pass
    finally:
        if took is None:
            p.kill()
        else:
            p.terminate()
        p.wait(timeout=600)
        sock.close()
        os.unlink(path)
        os.rmdir(tmp)
    return {"load": load, "ready_s": None if took is None else round(took, 3),
            "page_cache_dropped": dropped}


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    kvstored, data_dir = sys.argv[1], sys.argv[2]
    for load in sys.argv[3:] or ["warm", "lazy", "eager"]:
        print(json.dumps(ready_s(kvstored, data_dir, load)), flush=True)


if __name__ == "__main__":
    main()
