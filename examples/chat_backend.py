"""A chat back-end for connmix-tx in ~30 lines (see docs/client.md).

The default entry script pushes every client message to queue "foo".  "/join ROOM" subscribes the
sender to ROOM; any other text is echoed to the sender and published to the sender's room.

    python examples/chat_backend.py [CENTER_URL]        (default http://127.0.0.1:6787)
"""

import sys

from twisted.internet.defer import Deferred
from twisted.internet.task import react

from connmix_tx.client import Client, QueueMessage


async def main(reactor, center_url: str = "http://127.0.0.1:6787") -> None:
    client = Client(center_url=center_url, reactor=reactor)

    async def on_message(message: QueueMessage) -> None:
        sender, text = message.client_id, message.data["msg"]["data"]
        context = message.data["ctx"] or {}  # the context at push time ([] when empty)
        if text.startswith("/join "):
            room = text.removeprefix("/join ").strip()
            await client.subscribe(sender, room)
            await client.set_context_value(sender, "room", room)
            await client.send(sender, f"joined {room}")
        else:
            await client.send(sender, f"echo: {text}")
            if "room" in context:
                await client.publish(context["room"], f"{sender}: {text}")

    client.start()
    await client.ready()
    await client.consume("foo", on_message)
    print("chat backend: consuming foo", flush=True)
    await Deferred()  # serve until interrupted


if __name__ == "__main__":
    react(main, sys.argv[1:])
