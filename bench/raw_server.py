"""Raw Autobahn-Twisted servers: the baselines the engine is measured against (issue 6).

``echo``   every message goes back to its sender (inbound baseline).
``push``   a control connection on ``/ctl`` sends ``{"c": index, "d": text}`` requests; each is
           written to the ``index``-th client (connection order) and answered ``ok``
           (the mesh.send baseline: JSON request in, one push out, no Lua, no routing).
``fanout`` a control request ``{"n": count, "d": text}`` writes one prepared frame to every
           client ``count`` times (the publish baseline: prepareMessage + sendPreparedMessage).

``echo`` is also the baseline of the handshake and idle-memory rows (``bench/run.py`` starts a
fresh one per memory round).

Run: ``python bench/raw_server.py MODE PORT`` (127.0.0.1 only).
"""

from __future__ import annotations

import json
import sys

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor


class Server(WebSocketServerProtocol):
    factory: Factory

    def onConnect(self, request):
        self.control = request.path == "/ctl"

    def onOpen(self) -> None:
        if not self.control:
            self.factory.clients.append(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        mode = self.factory.mode
        if mode == "echo":
            self.sendMessage(payload, isBinary)
        elif self.control and mode == "push":
            request = json.loads(payload)
            self.factory.clients[request["c"]].sendMessage(request["d"].encode())
            self.sendMessage(b"ok")
        elif self.control and mode == "fanout":
            request = json.loads(payload)
            prepared = self.factory.prepareMessage(request["d"].encode())
            for _ in range(request["n"]):
                for client in self.factory.clients:
                    client.sendPreparedMessage(prepared)
            self.sendMessage(b"ok")

    def onClose(self, wasClean, code, reason) -> None:
        if self in self.factory.clients:
            self.factory.clients.remove(self)


class Factory(WebSocketServerFactory):
    protocol = Server

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.clients: list[Server] = []
        self.setProtocolOptions(autoPingInterval=0, webStatus=False)


def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    reactor.listenTCP(port, Factory(mode), interface="127.0.0.1", backlog=4096)
    print(f"raw {mode} server on 127.0.0.1:{port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
