"""Serve a service's own Prometheus metrics on a loopback address, for the agent and the sync.

The endpoint has no authentication, so the ``[metrics] listen`` address must be
in 127.0.0.0/8 or ``::1``. A Prometheus on the same host, or one through an SSH
tunnel, scrapes it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

LISTEN_EXAMPLE = '"127.0.0.1:9731" or "[::1]:9731"'


@dataclasses.dataclass(frozen=True)
class ListenAddress:
    """A loopback IP address and TCP port that a metrics endpoint listens on."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The URL that Prometheus scrapes."""
        return f"http://{self}/metrics"


def _split(value: str) -> tuple[str, str] | None:
    """Split "host:port" or "[v6]:port" into its host and port text, or return None when that form is not met."""
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            return None
        return host, rest[1:]

    host, colon, port = value.rpartition(":")
    if not colon or ":" in host:
        return None
    return host, port


def listen_problem(value: Any) -> str | None:
    """Return why VALUE is not a valid ``[metrics] listen`` value, or None when it is valid."""
    expected = (f"must be a loopback IP address (127.0.0.0/8 or ::1) and a port, such as {LISTEN_EXAMPLE}, "
                "because the metrics endpoint has no authentication; port 0 turns it off")
    if not isinstance(value, str):
        return expected

    parts = _split(value)
    if parts is None:
        return expected
    host, port_text = parts

    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return expected
    if not address.is_loopback:
        return expected

    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        return f"has an invalid port {port_text!r}. Use a TCP port from 1 to 65535, or 0 to turn the endpoint off"
    return None


def parse_listen(value: str) -> ListenAddress | None:
    """Return the address of a valid ``[metrics] listen`` VALUE, or None when its port 0 turns metrics off."""
    parts = _split(value)
    if parts is None:
        raise ValueError(f"invalid metrics listen address {value!r}")
    host, port_text = parts

    port = int(port_text)
    if port == 0:
        return None
    return ListenAddress(host=host, port=port)


class MetricsEndpoint:
    """An HTTP server, on a daemon thread, that renders one collector's metrics at each scrape of /metrics."""

    def __init__(self, address: ListenAddress, collector: Collector, service: str):
        # Imported here, because a service without a [metrics] table never needs prometheus_client.
        from prometheus_client import CollectorRegistry

        self.address = address
        self.service = service
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Start serving and return True, or log why and return False when the address cannot be bound.

        A failed endpoint does not stop the service, because sending and
        recording images matter more than its metrics; Prometheus then reports
        the scrape target as down.
        """
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(self.address.port, self.address.host, self.registry)
        except OSError as error:
            log.error("Cannot serve the %s's Prometheus metrics on %s: %s. The %s runs without metrics. "
                      "Free the port or set another [metrics] listen port.",
                      self.service, self.address, error.strerror or error, self.service)
            return False

        self._thread.name = f"{self.service}-metrics"
        log.info("Serving the %s's Prometheus metrics at %s.", self.service, self.address.url)
        return True

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._server is None:
            return

        self._server.shutdown()
        self._server.server_close()
        self._server = None
        log.info("Stopped serving the %s's Prometheus metrics at %s.", self.service, self.address.url)
