"""The leader's step messages to the other processes: one TCP connection per follower.

A write to the coordination service's key-value store, which carried them first, costs
about 190 µs plus 20 µs per KB of host time (a gRPC call), and on the 8B shape that host
time sets the step (docs/performance.md). A send on an open connection costs a system call.

The store still does the introductions. The leader listens on `distributed.step_port` (0:
any free port), and puts the port and a random secret under the channel's keys; each
follower reads them, connects to the coordinator's host (process 0 is the leader), and
sends the secret and its process index. The leader accepts one connection per other
process within `init_timeout_s` and drops any that does not present the secret: the
messages carry token ids, so only processes that can read the deployment's store join.

A message is its length (4 bytes, little-endian) and its bytes. A follower that dies
breaks its connection: the leader's next send raises a DeploymentError naming it, and
`lost_peers` names it at once (the server's watchdog asks it every second); a leader that
dies closes every connection, and each follower's receive raises one.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time

from jaxserve.errors import DeploymentError

_LENGTH = struct.Struct("<I")
_SECRET_BYTES = 32  # hex characters
_HELLO = _SECRET_BYTES + 4  # the secret, then the process index (int32)


class StepSocket:
    """Leader side: `send` to every follower. Follower side: `receive` from the leader."""

    def __init__(self, client, prefix: str, *, process_index: int, num_processes: int,
                 leader_host: str, port: int = 0, timeout_s: float = 60.0):
        """client: the key-value store (jax.distributed's client); prefix: the channel's
        keys; leader_host: the host followers connect to (the coordinator's)."""
        self._leader = process_index == 0
        self._peers: dict[int, socket.socket] = {}
        self._conn: socket.socket | None = None
        if self._leader:
            self._accept(client, prefix, num_processes, port, timeout_s)
        else:
            self._connect(client, prefix, process_index, leader_host, timeout_s)

    # ----- leader ------------------------------------------------------------------------

    def _accept(self, client, prefix, num_processes, port, timeout_s):
        secret = os.urandom(_SECRET_BYTES // 2).hex().encode()
        try:
            if socket.has_dualstack_ipv6():  # followers may reach us by IPv4 or IPv6
                server = socket.create_server(("", port), family=socket.AF_INET6,
                                              dualstack_ipv6=True)
            else:
                server = socket.create_server(("", port))
        except OSError as e:
            raise DeploymentError(f"the leader cannot listen for step messages on port "
                                  f"{port} (distributed.step_port): {e.strerror or e}") from None
        with server:
            client.key_value_set_bytes(prefix + "secret", secret)
            client.key_value_set_bytes(prefix + "port", str(server.getsockname()[1]).encode())
            deadline = time.monotonic() + timeout_s
            want = set(range(1, num_processes))
            while want - self._peers.keys():
                server.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    missing = sorted(want - self._peers.keys())
                    raise DeploymentError(
                        f"process(es) {missing} did not connect to the leader's step channel "
                        f"(port {server.getsockname()[1]}) within {timeout_s:g} s: is that "
                        "port reachable from every host? distributed.step_port sets it"
                    ) from None
                index = _hello(conn, secret, deadline)
                if index is None or index not in want or index in self._peers:
                    conn.close()  # a stranger, or a process already connected
                    continue
                _tune(conn)
                self._peers[index] = conn

    def send(self, payload: bytes) -> None:
        frame = _LENGTH.pack(len(payload)) + payload
        for index, conn in self._peers.items():
            try:
                conn.sendall(frame)
            except OSError as e:
                raise DeploymentError(f"process {index} dropped the step channel "
                                      f"({e.strerror or e}): it stopped or lost its "
                                      "network") from None

    def lost_peers(self) -> list[int]:
        """The followers whose connection has closed (the leader's side, without waiting):
        a follower never writes after its hello, so a connection with something to read is
        one that ended. A process that dies is seen here at once, also during warm-up, when
        no step message is sent that could fail."""
        if not self._peers:
            return []
        readable, _, _ = select.select(list(self._peers.values()), [], [], 0)
        lost = []
        for index, conn in self._peers.items():
            if conn in readable:
                try:
                    ended = conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
                except BlockingIOError:
                    ended = False
                except OSError:  # reset by the peer's host
                    ended = True
                if ended:
                    lost.append(index)
        return sorted(lost)

    # ----- follower ----------------------------------------------------------------------

    def _connect(self, client, prefix, process_index, leader_host, timeout_s):
        wait_ms = int(timeout_s * 1000)
        try:
            secret = client.blocking_key_value_get_bytes(prefix + "secret", wait_ms)
            port = int(client.blocking_key_value_get_bytes(prefix + "port", wait_ms))
        except Exception as e:  # noqa: BLE001 -- jaxlib raises its own error type
            raise DeploymentError(f"the leader did not open its step channel within "
                                  f"{timeout_s:g} s ({str(e).splitlines()[0]})") from None
        try:
            conn = socket.create_connection((leader_host, port), timeout=timeout_s)
        except OSError as e:
            raise DeploymentError(f"cannot reach the leader's step channel at "
                                  f"{leader_host}:{port} ({e.strerror or e}): is the port "
                                  "reachable from this host? distributed.step_port sets "
                                  "it") from None
        conn.sendall(secret + struct.pack("<i", process_index))
        conn.settimeout(None)
        _tune(conn)
        self._conn = conn

    def receive(self) -> bytes:
        (n,) = _LENGTH.unpack(self._read(_LENGTH.size))
        return self._read(n)

    def _read(self, n: int) -> bytes:
        data = _recv_exactly(self._conn, n)
        if data is None:
            raise DeploymentError("the leader closed the step channel: it stopped")
        return data

    def close(self) -> None:
        for conn in [*self._peers.values(), self._conn]:
            if conn is not None:
                conn.close()


def _tune(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small messages, now
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def _recv_exactly(conn: socket.socket, n: int) -> bytes | None:
    """The next n bytes of a connection; None if it closes first."""
    data = bytearray(n)
    view, got = memoryview(data), 0
    while got < n:
        k = conn.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return bytes(data)


HELLO_TIMEOUT_S = 5.0  # a follower sends its hello as it connects; a silent peer is dropped


def _hello(conn: socket.socket, secret: bytes, deadline: float) -> int | None:
    """The process index a new connection presents with the right secret, else None (also
    when it says nothing within HELLO_TIMEOUT_S: it must not hold up the others)."""
    conn.settimeout(max(0.01, min(deadline - time.monotonic(), HELLO_TIMEOUT_S)))
    try:
        data = _recv_exactly(conn, _HELLO)
    except OSError:
        return None
    if data is None or data[:_SECRET_BYTES] != secret:
        return None
    conn.settimeout(None)
    return struct.unpack("<i", data[_SECRET_BYTES:])[0]
