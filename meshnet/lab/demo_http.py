"""The lab's demo workloads: a tiny HTTP server that names itself, and a client.

    python3 demo_http.py serve [--port 8080] [--name NAME]
    python3 demo_http.py get URL [--tries N]
    python3 demo_http.py front --backend URL [--port 8080] [--name NAME]

`serve` answers every GET with "NAME on HOST" (plus " vN" when $VERSION is N). `front` answers
with its own name plus what it got from the backend, which is how the lab shows a frontend
reaching a backend by name.

It uses only the standard library: a contained task runs it with the host's python3 (tasks see
the host's root file system, read-only) from this directory, bound into the task read-only
(TASK_MOUNT), as `docker run -v DIR:DIR:ro` would. Nothing else of meshnet is visible to it.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEMO_DIR = os.path.dirname(os.path.abspath(__file__))
# meshctl flags and command that run this file inside a task (see the module's docstring).
TASK_MOUNT = ["--mount", f"type=bind,source={DEMO_DIR},target={DEMO_DIR},readonly"]
TASK_ARGV = ["python3", os.path.join(DEMO_DIR, "demo_http.py")]


def _host() -> str:
    return os.environ.get("MESHNET_NODE", socket.gethostname())


def _get(url: str, timeout: float = 5.0) -> str:
    """GET url, connecting to the FIRST address the DNS answer lists. getaddrinfo would re-sort
    the rotated answer by RFC 6724 (longest prefix first) and so always pick the same task;
    gethostbyname_ex keeps the server's order, which is what spreads calls over the tasks."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    addrs = socket.gethostbyname_ex(host)[2]
    netloc = addrs[0] + (f":{parts.port}" if parts.port else "")
    target = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    req = urllib.request.Request(target, headers={"Host": parts.netloc})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=timeout) as r:
        return str(r.read().decode().strip())


def serve(port: int, name: str, backend: str | None) -> None:
    # A rolling update (`service update --env-add VERSION=2`) shows in every answer.
    version = os.environ.get("VERSION")

    class Handler(BaseHTTPRequestHandler):
        # Keep-alive (every answer has a Content-Length): a client may hold one connection open
        # and send again, as the VIP tests do; urllib's `Connection: close` still closes.
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = f"{name} on {_host()}" + (f" v{version}" if version else "")
            if backend:
                try:
                    body += f" -> {_get(backend)}"
                except OSError as e:
                    body += f" -> backend error: {e}"
            data = (body + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt: str, *args: object) -> None:
            sys.stderr.write(f"{name}: {fmt % args}\n")

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    print(f"{name} listening on :{port}", file=sys.stderr, flush=True)  # every log has a line
    server.serve_forever()


def get(url: str, tries: int) -> int:
    for attempt in range(tries):
        try:
            print(_get(url), flush=True)
            return 0
        except OSError as e:
            if attempt == tries - 1:
                print(f"GET {url} failed: {e}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="demo_http")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--name", default=os.environ.get("MESHNET_TASK", socket.gethostname()))
    f = sub.add_parser("front")
    f.add_argument("--backend", required=True)
    f.add_argument("--port", type=int, default=8080)
    f.add_argument("--name", default=os.environ.get("MESHNET_TASK", socket.gethostname()))
    g = sub.add_parser("get")
    g.add_argument("url")
    g.add_argument("--tries", type=int, default=10)
    ns = p.parse_args(argv)
    if ns.cmd == "get":
        return get(ns.url, ns.tries)
    serve(ns.port, ns.name, ns.backend if ns.cmd == "front" else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
