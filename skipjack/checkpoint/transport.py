"""How snapshot agents on different machines reach each other: each agent serves its node's
parity files and snapshot over TCP (`serve`), and `Remote` calls another node's agent with the
methods its local files answer to (`parity.NodeFiles`), so the parity code never knows which
node is where.

One request per connection: a JSON header (the job's token, the operation, its arguments) and
optionally a payload of bytes; the reply is a JSON header and optionally bytes. The token is
drawn by rank 0 at every start of the job and handed to the agents with the peers' addresses
(`peers.json`, readable by the user only); a request without it is refused. A node that does
not answer (its machine or agent is gone) reads as holding nothing.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable

import numpy as np

CONNECT = 2.0  # seconds to reach a peer (a machine that is gone does not refuse, it is silent)
TIMEOUT = 60.0  # seconds a peer may take to answer one request
OPERATIONS = {"put", "get", "has", "blob"}


def _send(sock: socket.socket, header: dict, payload=None) -> None:
    data = json.dumps({**header, "size": 0 if payload is None else len(payload)}).encode()
    sock.sendall(len(data).to_bytes(4, "little") + data)
    if payload is not None and len(payload):
        sock.sendall(memoryview(payload).cast("B"))


def _receive_exactly(sock: socket.socket, size: int) -> np.ndarray:
    buffer = np.empty(size, dtype=np.uint8)
    view, got = memoryview(buffer), 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise ConnectionError("the peer closed the connection mid-message")
        got += n
    return buffer


def _receive(sock: socket.socket) -> tuple[dict, np.ndarray]:
    size = int.from_bytes(_receive_exactly(sock, 4).tobytes(), "little")
    header = json.loads(_receive_exactly(sock, size).tobytes())
    return header, _receive_exactly(sock, header.pop("size"))


class Server(socketserver.ThreadingTCPServer):
    """Answers the agent's peers with `store` (a `parity.NodeFiles`) once `token()` is known."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, store, token: Callable[[], str | None]):
        super().__init__(("0.0.0.0", 0), _Handler)
        self.store, self.token = store, token

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> Server:
        threading.Thread(target=self.serve_forever, daemon=True, name="skipjack-peers").start()
        return self


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: Server = self.server  # type: ignore[assignment]
        self.request.settimeout(TIMEOUT)
        try:
            header, payload = _receive(self.request)
            op, token = header.get("op"), server.token()
            if token is None or header.get("token") != token or op not in OPERATIONS:
                _send(self.request, {"error": "refused: unknown job token or operation"})
                return
            args = header.get("args", [])
            result = getattr(server.store, op)(*args, *([payload] if op == "put" else []))
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            try:
                _send(self.request, {"error": f"{type(error).__name__}: {error}"})
            except OSError:
                pass
            return
        if isinstance(result, np.ndarray):
            _send(self.request, {"bytes": True}, result)
        else:
            _send(self.request, {"result": result})


class Remote:
    """Another node's files, through its agent at `address` (host, port); every method answers
    as `parity.NodeFiles` does, and as a node holding nothing when the agent does not answer."""

    def __init__(self, address: tuple[str, int], token: str):
        self.address, self.token = (address[0], int(address[1])), token

    def _call(self, op: str, *args, payload=None):
        try:
            with socket.create_connection(self.address, timeout=CONNECT) as sock:
                sock.settimeout(TIMEOUT)
                _send(sock, {"op": op, "token": self.token, "args": list(args)}, payload)
                header, data = _receive(sock)
        except OSError:
            return None
        if "error" in header:
            return None
        return data if header.get("bytes") else header.get("result")

    def answers(self, timeout: float = 60.0) -> bool:
        """Whether the agent answers to this token within `timeout` seconds (it takes up a new
        token at its next look)."""
        deadline = time.monotonic() + timeout
        while self._call("has", []) is None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def put(self, path: str, data) -> bool:
        return bool(self._call("put", path, payload=data))

    def get(self, path: str) -> np.ndarray | None:
        return self._call("get", path)

    def has(self, paths: list[str]) -> list[bool]:
        return self._call("has", paths) or [False] * len(paths)

    def blob(self, step: int) -> np.ndarray | None:
        return self._call("blob", step)


def reachable_host() -> str:
    """This machine's address as the job's other machines reach it: the local end of a route to
    the rendezvous host (MASTER_ADDR, which every launcher sets), else the host name."""
    master = os.environ.get("MASTER_ADDR")
    if master:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((master, 9))  # a UDP "connect" sends nothing; it picks the route
                return probe.getsockname()[0]
            except OSError:
                pass
    return socket.gethostname()
