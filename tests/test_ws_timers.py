"""Autobahn's protocol timers run at the time asked for (connmix_tx/engine/ws_settings.py,
``ExactTimer``).

Autobahn schedules the opening-handshake, close-handshake and connection-drop timeouts on a txaio
batched timer that truncates the deadline to a whole second: the 1 s close handshake ran out
anywhere from 0 to 1 s after the close frame.  A client that answers a close within a second must
get its clean close.
"""

from __future__ import annotations

import asyncio
import socket

from twisted.internet.task import Clock

from conftest import in_asyncio, loopback_config, start_engine
from connmix_tx.engine.ws_settings import ExactTimer
from connmix_tx.testing import LogCapture
from netclients import masked_frame, raw_handshake, until

CLOSE_1000 = b"\x88\x02\x03\xe8"  # the server's close frame: FIN + close, code 1000


def test_a_timer_runs_at_its_delay_not_at_the_next_whole_second() -> None:
    clock = Clock()
    clock.advance(5.9)
    timer = ExactTimer(clock)
    fired: list[float] = []
    timer.call_later(1.0, lambda: fired.append(clock.seconds()))
    clock.advance(0.1)  # 6.0: a whole second, where the batched timer fired
    assert fired == []
    clock.advance(0.85)  # 6.85
    assert fired == []
    clock.advance(0.1)  # 6.95: past 5.9 + 1.0
    assert len(fired) == 1


def test_a_timer_cancelled_before_or_after_it_ran_is_quiet() -> None:
    clock = Clock()
    timer = ExactTimer(clock)
    fired: list[str] = []
    early = timer.call_later(1.0, fired.append, "early")
    late = timer.call_later(0.5, fired.append, "late")
    early.cancel()
    clock.advance(2)
    late.cancel()  # already ran: nothing to do, no AlreadyCalled
    early.cancel()
    assert fired == ["late"]


@in_asyncio
async def test_clients_that_answer_a_close_within_the_timeout_close_cleanly() -> None:
    running = await start_engine(loopback_config())
    loop = asyncio.get_running_loop()
    port = running.service.engine.protocol_listeners[0].actual_port
    socks = [await raw_handshake(port) for _ in range(4)]
    try:
        connections = running.service.engine.connections.by_id
        await until(lambda: len(connections) == 4)
        ids = [conn.client_id for conn in connections.values()]
        by_id = dict(connections)

        async def close_and_answer_late(client_id: int, sock: socket.socket, start: float) -> None:
            await asyncio.sleep(start)
            by_id[client_id].transport.close_connection()  # conn:close(): 1000, then the 1 s handshake
            assert await asyncio.wait_for(loop.sock_recv(sock, 16), 5) == CLOSE_1000
            await asyncio.sleep(0.6)  # answer late, but well within the second
            try:
                gone = sock.recv(16, socket.MSG_PEEK) == b""
            except BlockingIOError:
                gone = False
            except ConnectionResetError:
                gone = True
            assert not gone, "the engine dropped a client before its close-handshake timeout"
            await loop.sock_sendall(sock, masked_frame(b"\x03\xe8", opcode=8))

        with LogCapture() as logs:
            # Four closes a quarter second apart: whatever the clock's fraction, a timer rounded
            # to whole seconds would cut at least one of them off before its answer.
            await asyncio.gather(*(close_and_answer_late(cid, sock, i * 0.25)
                                   for i, (cid, sock) in enumerate(zip(ids, socks))))
            await until(lambda: not connections)
        for client_id in ids:  # on_close was told nil: a clean close, not "connection lost"
            assert logs.find(f"client {client_id} closed: normal"), logs.lines
    finally:
        for sock in socks:
            sock.close()
        await running.stop()
