"""The HTTP listener of a pod's gateway process: shared by several sockets (SO_REUSEPORT), and
its connections get TCP_NODELAY from asyncio as those of uvicorn's own listener do (without it
every response waited ~40 ms for a delayed ACK)."""

from __future__ import annotations

import asyncio
import socket

from services.gateway.app import reuse_port_socket
from services.net import free_port


def test_two_listeners_share_a_port_and_connections_get_tcp_nodelay() -> None:
    port = free_port()
    first, second = reuse_port_socket("127.0.0.1", port), reuse_port_socket("127.0.0.1", port)
    nodelay: list[int] = []

    async def main() -> None:
        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            nodelay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        servers = [await asyncio.start_server(accepted, sock=s) for s in (first, second)]
        for _ in range(4):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
        for _ in range(100):
            if len(nodelay) == 4:
                break
            await asyncio.sleep(0.01)
        for server in servers:
            server.close()

    asyncio.run(main())
    assert len(nodelay) == 4 and all(nodelay)
