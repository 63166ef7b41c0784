"""HTTP plumbing shared by the fake servers (ctiqa.testing.fake_gemini, tests/fake_hub.py): 127.0.0.1 only."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
