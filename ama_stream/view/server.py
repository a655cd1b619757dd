"""The alert page's HTTP server: the page itself (static, no build step), its state as JSON, and the
frames and heatmaps of the alerts on it. Loopback by default: the page shows production frames."""
from __future__ import annotations

import json
import logging
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from .board import Board
from .tail import FrameStore

log = logging.getLogger(__name__)


def page() -> bytes:
    return resources.files("ama_stream.view").joinpath("page.html").read_bytes()


class ViewServer:
    def __init__(self, board: Board, frames: FrameStore, host: str = "127.0.0.1", port: int = 8080):
        html = page()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                path = urllib.parse.urlsplit(self.path).path
                if path in ("/", "/index.html"):
                    self._reply(200, html, "text/html; charset=utf-8")
                elif path == "/state":
                    self._reply(200, json.dumps(board.snapshot()).encode(), "application/json")
                elif path.startswith(("/frame/", "/map/")):
                    self._image(path)
                else:
                    self._reply(404, b"not found\n", "text/plain")

            def _image(self, path: str) -> None:
                kind, _, key = path[1:].partition("/")
                alert = board.find(urllib.parse.unquote(key))  # only frames of alerts on the board are served
                if alert is None:
                    self._reply(404, b"no such alert\n", "text/plain")
                    return
                if kind == "map":
                    png = alert.map_png
                else:
                    r = alert.record
                    try:
                        png = frames.get(str(r["topic"]), int(r["partition"]), int(r["offset"]))
                    except (KeyError, TypeError, ValueError):
                        png = None
                if png is None:
                    self._reply(404, b"not available\n", "text/plain")
                else:
                    self._reply(200, png, "image/png")

            def _reply(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store" if content_type == "application/json" else "max-age=60")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline' 'self'; "
                                                            "style-src 'unsafe-inline' 'self'; img-src 'self'")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args) -> None:
                log.debug("view %s", fmt % args)

        try:
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise OSError(exc.errno, f"alert page cannot bind {host}:{port}: {exc.strerror} (choose another with "
                                     "--port P, or 0 for any free port)") from None
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://{host}:{self.port}/"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="ama-view-http", daemon=True)

    def start(self) -> "ViewServer":
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
