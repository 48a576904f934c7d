"""A loopback TCP proxy that stands in for network faults between a run and its S3 endpoint.

Modes, switchable at runtime (from the test, or from a Ray worker through the control port):
``pass`` forwards; ``refuse`` closes the listener (connection refused); ``reset`` accepts and sends an
RST; ``blackhole`` accepts and reads but never answers. Switching to ``refuse``/``reset`` cuts the
connections already open, and ``blackhole`` stalls them, as a real outage does to pooled clients.

``scope``: a ``reset`` that hits only requests whose request line contains it (one prefix of the
bucket fails, the rest works). ``arm(pattern, …, after=n)``: start an outage the moment the (n+1)-th
request whose first line matches the regular expression arrives (that request gets it too), so a
test hits one exact operation — the second checkpoint registration, the save of version 3 — without
guessing its timing.

Thread-based, stdlib only, 127.0.0.1 only.
"""
from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
import time

MODES = ("pass", "refuse", "reset", "blackhole")
_METHODS = (b"GET ", b"PUT ", b"POST ", b"HEAD ", b"DELETE ")


def _rst(sock: socket.socket) -> None:
    """Abortive close (RST); the shutdown also wakes a thread blocked in recv on this socket."""
    for op in (lambda: sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)),
               lambda: sock.shutdown(socket.SHUT_RDWR), sock.close):
        with contextlib.suppress(OSError):  # the peer may already be gone: closing is best effort
            op()


def _line(chunk: bytes) -> str:
    return chunk.split(b"\r\n", 1)[0].decode(errors="replace")


def send_control(port: int, command: str, timeout: float = 5.0) -> str:
    """One control line to a proxy: ``mode <m> [seconds] [scope]``, ``arm <m> <seconds> <pattern> [scope]``, ``clear``
    (no spaces inside a pattern or scope: write ``\\s``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(command.encode() + b"\n")
        return s.makefile().readline().strip()


class FaultProxy:
    def __init__(self, target: str):
        host, _, port = target.replace("http://", "").rstrip("/").partition(":")
        self.target = (host, int(port))
        self.mode, self.scope = "pass", None
        self.log: list[tuple[float, str, str]] = []  # (time, mode, request line) of every faulted request
        self._lock = threading.RLock()
        self._conns: set[socket.socket] = set()
        self._until: float | None = None             # a timed outage returns to pass then
        self._armed: list | None = None               # [pattern, mode, seconds, scope, matches to let pass]
        self._closed = False
        self._listener: socket.socket | None = None
        self.port = 0
        self._listen()
        self.url = f"http://127.0.0.1:{self.port}"
        self._ctl = socket.create_server(("127.0.0.1", 0))
        self.control_port = self._ctl.getsockname()[1]
        for fn in (self._accept_loop, self._control_loop, self._timer_loop):
            threading.Thread(target=fn, daemon=True, name=f"proxy{fn.__name__}").start()

    # ------------------------------------------------------------------ control
    def set_mode(self, mode: str, duration_s: float | None = None, scope: str | None = None) -> None:
        """Switch now; with ``duration_s`` the proxy returns to ``pass`` by itself afterwards."""
        if mode not in MODES:
            raise ValueError(f"unknown proxy mode {mode!r}; valid: {MODES}")
        if scope and mode != "reset":
            raise ValueError("a scoped fault resets the matching requests: use mode 'reset'")
        with self._lock:
            before, self.mode, self.scope = self.mode, mode, scope
            self._until = time.monotonic() + duration_s if duration_s else None
            if mode == "refuse" and self._listener is not None:
                self._listener.close()
                self._listener = None
            if (mode in ("refuse", "reset") and not scope) or before == "blackhole":  # stalled streams would
                for c in list(self._conns):                                           # mismatch later answers
                    _rst(c)
                self._conns.clear()
            if mode != "refuse":
                self._listen()

    def arm(self, pattern: str, mode: str, duration_s: float, scope: str | None = None, after: int = 0) -> None:
        """Start a ``mode`` outage of ``duration_s`` when the (after+1)-th request line matching ``pattern`` arrives."""
        if mode not in MODES[1:]:
            raise ValueError(f"arm takes a fault mode, one of {MODES[1:]}")
        with self._lock:
            self._armed = [re.compile(pattern), mode, duration_s, scope, after]

    def clear(self) -> None:
        with self._lock:
            self._armed = None
            self.set_mode("pass")

    def close(self) -> None:
        self.set_mode("reset")
        self._closed = True
        for s in (self._listener, self._ctl):
            if s is not None:
                s.close()

    def faulted(self, match: str = "") -> list[str]:
        """Request lines that met a fault (refused connections carry no request: not listed)."""
        return [line for _, _, line in self.log if match in line]

    # ------------------------------------------------------------------ plumbing
    def _listen(self) -> None:
        if self._listener is not None or self._closed:
            return
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for attempt in range(50):  # the port of a just-closed listener can take a moment to free
            try:
                s.bind(("127.0.0.1", self.port))
                break
            except OSError:
                if attempt == 49:
                    raise
                time.sleep(0.05)
        s.listen(64)
        s.settimeout(0.2)
        self.port = s.getsockname()[1]
        self._listener = s

    def _accept_loop(self) -> None:
        while not self._closed:
            lst = self._listener
            if lst is None:
                time.sleep(0.05)
                continue
            try:
                client, _ = lst.accept()
            except OSError:  # timeout, or the listener closed for refuse
                continue
            client.settimeout(None)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _fault(self, chunk: bytes) -> str:
        """The mode that applies to this chunk from a client (``pass`` for requests outside a scope)."""
        armed = self._armed
        if armed and chunk.startswith(_METHODS) and armed[0].search(_line(chunk)):
            with self._lock:
                if self._armed is armed:
                    if armed[4] > 0:
                        armed[4] -= 1
                    else:
                        self._armed = None
                        self.set_mode(armed[1], armed[2], armed[3])
        mode, scope = self.mode, self.scope
        if mode == "pass" or not scope:
            return mode
        return mode if chunk.startswith(_METHODS) and scope in _line(chunk) else "pass"

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            self._conns.add(client)
        upstream = None
        try:
            while True:
                chunk = client.recv(65536)
                if not chunk:
                    return
                mode = self._fault(chunk)
                if mode != "pass" and chunk.startswith(_METHODS):
                    self.log.append((time.time(), mode, _line(chunk)))
                if mode == "blackhole":
                    continue  # read and drop: the client waits for an answer that never comes
                if mode in ("reset", "refuse"):
                    _rst(client)
                    return
                if upstream is None:
                    upstream = socket.create_connection(self.target, timeout=5)
                    upstream.settimeout(None)
                    with self._lock:
                        self._conns.add(upstream)
                    threading.Thread(target=self._answers, args=(upstream, client), daemon=True).start()
                upstream.sendall(chunk)
        except OSError:
            _rst(client)
        finally:
            for s in (client, upstream):
                if s is not None:
                    with self._lock:
                        self._conns.discard(s)
                    with contextlib.suppress(OSError):
                        s.close()

    def _answers(self, upstream: socket.socket, client: socket.socket) -> None:
        try:
            while chunk := upstream.recv(65536):
                if self.mode == "blackhole":
                    continue
                client.sendall(chunk)
        except OSError:  # either side closed: this relay direction is done
            return
        finally:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_WR)

    def _timer_loop(self) -> None:
        while not self._closed:
            time.sleep(0.05)
            with self._lock:
                if self._until is not None and time.monotonic() >= self._until:
                    self.set_mode("pass")

    def _control_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._ctl.accept()
            except OSError:
                return
            with conn:
                try:
                    p = conn.makefile().readline().split()
                    if p[0] == "mode":
                        self.set_mode(p[1], float(p[2]) if len(p) > 2 and float(p[2]) > 0 else None, p[3] if len(p) > 3 else None)
                    elif p[0] == "arm":
                        self.arm(p[3], p[1], float(p[2]), p[4] if len(p) > 4 else None)
                    elif p[0] == "clear":
                        self.clear()
                    else:
                        raise ValueError(f"unknown command {p[0]!r}")
                    conn.sendall(f"ok {self.mode}\n".encode())
                except Exception as e:  # a malformed command must not stop the proxy
                    conn.sendall(f"error {type(e).__name__}: {e}\n".encode())
