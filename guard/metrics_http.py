"""The Prometheus /metrics endpoint: prometheus-client's WSGI app on a threaded HTTP server whose
connections time out.

prometheus-client's own `start_http_server` sets no socket timeout, so every connection that
opens and then says nothing (a stalled scraper, a port scanner) holds a thread for as long as it
stays open. Here each connection's socket times out after `timeout_s`, and the thread ends.
"""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

SOCKET_TIMEOUT_S = 10.0


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a connection's thread never holds the process at exit


def _family(host: str, port: int) -> socket.AddressFamily:
    """The address family of `host` (IPv6 for an IPv6 address or name, else IPv4)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return infos[0][0]


def start_metrics_server(
    port: int, host: str, registry: CollectorRegistry, timeout_s: float = SOCKET_TIMEOUT_S
) -> tuple[WSGIServer, threading.Thread]:
    """Serve `registry` on http://host:port/metrics from a daemon thread; returns the server
    (`server_port` is the port bound, for port 0) and its thread. Raises OSError (port taken)."""

    class Handler(WSGIRequestHandler):
        timeout = timeout_s  # StreamRequestHandler applies it to the connection's socket

        def log_message(self, format: str, *args: object) -> None:
            """Log nothing: one line per scrape (or timed-out connection) is noise."""

    server_class = type("MetricsServer", (_Server,), {"address_family": _family(host, port)})
    httpd: WSGIServer = make_server(
        host, port, make_wsgi_app(registry), server_class, handler_class=Handler
    )
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return httpd, thread
