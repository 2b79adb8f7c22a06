"""A child process for the lease-expiry test: serves ``ns.backend.generate`` on the TCP plane
(instance ``tcp-child``) and on the NATS plane (instance ``nats-child``), each streaming an
item every 20 ms, prints ``ready`` and waits to be killed. Usage: nats_child.py NATS_URL"""

from __future__ import annotations

import asyncio
import sys

from tokenmill.runtime.interface import EndpointId
from tokenmill.runtime.nats_runtime import NatsRuntime, NatsRuntimeConfig


async def ticker(request, ctx):
    i = 0
    while True:
        yield i
        i += 1
        await asyncio.sleep(0.02)


async def main(url: str) -> None:
    ep = EndpointId("ns", "backend", "generate")
    tcp = await NatsRuntime.connect(url, NatsRuntimeConfig(request_plane="tcp"))
    nats = await NatsRuntime.connect(url, NatsRuntimeConfig(request_plane="nats"))
    await tcp.serve_endpoint(ep, ticker, instance_id="tcp-child")
    await nats.serve_endpoint(ep, ticker, instance_id="nats-child")
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
