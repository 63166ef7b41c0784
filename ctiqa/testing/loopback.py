"""HTTP plumbing shared by the fake servers (ctiqa.testing.fake_gemini, tests/fake_hub.py, the fake OpenAI servers
of the tests) and a ``transformers serve`` launcher (tests and bench/): 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def _quiet_disconnects(handle_error):
    """Server error hook that stays silent when a client hung up (timeouts, killed builders): expected in tests."""

    def hook(request, client_address):
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        handle_error(request, client_address)

    return hook


def start_server(dispatch: Callable[[BaseHTTPRequestHandler], None]) -> ThreadingHTTPServer:
    """Serve every request (GET/POST/PUT/HEAD/DELETE) with ``dispatch(handler)`` on 127.0.0.1, a free port, in a
    daemon thread. Stop with :func:`stop_server`."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            dispatch(self)

        do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _any  # noqa: N815

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.handle_error = _quiet_disconnects(server.handle_error)  # type: ignore[method-assign]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop_server(server: ThreadingHTTPServer | None) -> None:
    """Shut a server from :func:`start_server` down (None: nothing to do)."""
    if server is not None:
        server.shutdown()
        server.server_close()


class LoopbackServer:
    """Start/stop plumbing of a fake server on 127.0.0.1: a subclass defines ``dispatch(handler)``; ``url`` is
    ``http://127.0.0.1:PORT`` once started. Usable as a context manager."""

    _server: ThreadingHTTPServer | None = None

    def dispatch(self, handler: BaseHTTPRequestHandler) -> None:
        raise NotImplementedError

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self):
        self._server = start_server(self.dispatch)
        return self

    def stop(self) -> None:
        stop_server(self._server)
        self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def send_json(handler: BaseHTTPRequestHandler, status: int, payload: Any) -> None:
    """Answer a request with ``payload`` as JSON (HTTP ``status``, ``Content-Length`` set)."""
    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def transformers_serve(model: str | os.PathLike, *, log: Path | None = None, timeout_s: float = 240,
                       env: dict[str, str] | None = None) -> Iterator[str]:
    """``transformers serve MODEL`` on 127.0.0.1 (fp32 on the CPU, offline: ``HF_HUB_OFFLINE=1``); yields its URL
    once ``/health`` answers, and stops it on exit.

    Args:
        log: file for the server's output (default: discarded). timeout_s: how long to wait for it to start.
        env: extra environment variables of the server.
    Raises:
        RuntimeError: the server exited or did not answer within ``timeout_s`` (with the end of ``log``).
    """
    port = free_port()
    cli = Path(sys.executable).with_name("transformers")
    out = open(log, "w") if log is not None else subprocess.DEVNULL  # closed once the server has it
    try:
        proc = subprocess.Popen([str(cli), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu", "--dtype", "float32"], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    finally:
        if log is not None:
            out.close()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                tail = log.read_text()[-2000:] if log is not None else ""
                raise RuntimeError(f"transformers serve did not start: {tail}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
