"""A TCP forwarder for fault tests: ``python -m tests.tcpproxy PORT HOST:PORT [DELAY_MS]``.

It listens on 127.0.0.1:PORT and pipes every connection to HOST:PORT. Killing
the process is the fault (``tests.servers.TcpProxy``); DELAY_MS holds every
chunk that long in each direction, as a distant server would."""

from __future__ import annotations

import asyncio
import contextlib
import sys


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float = 0.0
) -> None:
    try:
        while data := await reader.read(65536):
            if delay:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def main(port: int, host: str, target_port: int, delay: float = 0.0) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(host, target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer, delay), _pipe(up_reader, writer, delay))

    server = await asyncio.start_server(serve, "127.0.0.1", port, reuse_address=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    listen = int(sys.argv[1])
    target_host, _, target = sys.argv[2].rpartition(":")
    delay_ms = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    asyncio.run(main(listen, target_host, int(target), delay_ms / 1000))
