"""Exit 0 when RabbitMQ really works: connect, declare, publish, get, within 15 s.

An open port is not enough: a wedged broker was seen to accept TCP and then
never finish the AMQP handshake, and every test that needed it timed out.
"""

import asyncio
import sys

import aio_pika


async def main() -> None:
    connection = await aio_pika.connect("amqp://guest:guest@127.0.0.1:5672/", timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        await channel.default_exchange.publish(aio_pika.Message(b"ping"), routing_key=queue.name)
        for _ in range(50):
            message = await queue.get(no_ack=True, fail=False)
            if message is not None and message.body == b"ping":
                return
            await asyncio.sleep(0.1)
        raise RuntimeError("published message never came back")


try:
    asyncio.run(asyncio.wait_for(main(), 15))
except Exception as exc:  # any failure means: restart the broker
    print(f"RabbitMQ does not work: {exc!r}", file=sys.stderr)
    sys.exit(1)
