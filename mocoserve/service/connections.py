"""Connection limits for `mocoserve serve`: uvicorn's h11 protocol with deadlines and a cap.

uvicorn bounds none of a connection's waits but the keep-alive pause after a response: a
socket that never sends a byte, a request's headers sent one line every few seconds, or
a body trickling in at a byte a second each hold a connection for as long as the client
likes. `GuardedH11Protocol` gives each wait of a connection its own deadline:

    idle    no byte of a request yet (a new connection, or between keep-alive requests)
    header  from a request's first byte until its headers are complete
    body    from the end of the headers until the end of the body

and refuses a connection beyond `per_client` open ones from the same address (an IPv6
client by its /64, which one host usually holds whole). The app's own work is not timed.
It is passed to uvicorn as `Config(http=protocol_class(limits))`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from mocoserve.service.middleware import error_body


@dataclass(frozen=True)
class ConnectionLimits:
    """Seconds each wait may last, and open connections per client address (0: no limit)."""

    idle_timeout: float = 5.0
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    per_client: int = 64


def client_key(client: tuple[str, int] | None) -> str | None:
    """The address a per-client count is kept under: the IP, or an IPv6 address's /64."""
    if client is None:
        return None  # a Unix socket: one local client, not counted
    host = client[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def raw_error(status: int, reason: str, code: str, message: str) -> bytes:
    """A whole JSON error answer that closes the connection, for before or outside h11's
    request cycle (no request was read, or the app is still reading its body)."""
    body = json.dumps(error_body(code, message)).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with idle, header and body deadlines and a per-client cap."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    open_by_client: ClassVar[Counter[str | None]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase: str | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._key: str | None = None
        self._counted = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        key, most = client_key(self.client), self.limits.per_client
        if most and key is not None and self.open_by_client[key] >= most:
            # refused before reading a byte: the socket is freed at once, not at a timeout
            message = f"more than {most} open connections from your address; close some first"
            transport.write(raw_error(429, "Too Many Requests", "too_many_connections", message))
            transport.close()
            return
        self.open_by_client[key] += 1
        self._key, self._counted = key, True
        self._rearm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        self._release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return  # refused, or past a deadline: nothing more is read
        super().data_received(data)
        self._rearm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._rearm()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        # the WebSocket protocol takes the transport over: this one is never told it closed
        self._cancel()
        self._release()
        super().handle_websocket_upgrade(event)

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            self.open_by_client[self._key] -= 1
            if self.open_by_client[self._key] <= 0:
                del self.open_by_client[self._key]

    def _waiting_for(self) -> str | None:
        """Which wait the connection is in, or None while the app answers a whole request."""
        theirs = self.conn.their_state
        if theirs is h11.IDLE:
            return "header" if self.conn.trailing_data[0] else "idle"
        if theirs is h11.SEND_BODY:
            return "body"
        return None

    def _rearm(self) -> None:
        if self.transport is None or self.transport.is_closing():
            self._cancel()
            return
        phase = self._waiting_for()
        if phase == self._phase:
            return  # the same wait goes on: its deadline stands (a trickle does not reset it)
        self._cancel()
        self._phase = phase
        if phase is not None:
            seconds = getattr(self.limits, f"{phase}_timeout")
            self._deadline = self.loop.call_later(seconds, self._expired, phase)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = None

    def _expired(self, phase: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        answering = self.cycle is not None and self.cycle.response_started
        if phase != "idle" and not (phase == "body" and answering):
            seconds = getattr(self.limits, f"{phase}_timeout")
            what = "headers" if phase == "header" else "body"
            message = f"the request's {what} took longer than {seconds:g} s"
            self.transport.write(raw_error(408, "Request Timeout", "timeout", message))
        self.transport.close()  # connection_lost then ends the app's wait for the body


def protocol_class(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A protocol class for `uvicorn.Config(http=...)` with these limits and its own counts."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"limits": limits, "open_by_client": Counter()},
    )
