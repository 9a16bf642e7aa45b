from __future__ import annotations

import asyncio

from pyworker.serving.gate import GateRefusal, RouteGate


async def test_unlimited_gate_never_waits() -> None:
    gate = RouteGate(None, max_queue=0, max_queue_time=None)
    async with gate.slot(1), gate.slot(1):
        assert gate.active == 2 and gate.workload == 2
    assert gate.workload == 0


async def test_fifo_order_and_cancelled_waiters_leak_nothing() -> None:
    gate = RouteGate(1, max_queue=10, max_queue_time=None)
    order: list[int] = []
    release = asyncio.Event()

    async def use(n: int) -> None:
        async with gate.slot(1):
            order.append(n)
            if n == 0:
                await release.wait()

    tasks = [asyncio.create_task(use(0))]
    await asyncio.sleep(0)
    for n in range(1, 6):
        tasks.append(asyncio.create_task(use(n)))
        await asyncio.sleep(0)
    assert gate.waiting == 5
    tasks[2].cancel()
    tasks[4].cancel()
    release.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == [0, 1, 3, 5]
    assert gate.active == 0 and gate.waiting == 0 and gate.workload == 0


async def test_cancelled_just_after_handover_releases_the_slot() -> None:
    gate = RouteGate(1, max_queue=10, max_queue_time=None)
    first = gate.slot(1)
    await first.__aenter__()
    waiter = asyncio.create_task(gate.slot(1).__aenter__())
    await asyncio.sleep(0)
    await first.__aexit__(None, None, None)  # hands the slot to the waiter
    waiter.cancel()  # ...which is cancelled before it runs
    await asyncio.gather(waiter, return_exceptions=True)
    assert gate.active == 0
    async with gate.slot(1):
        assert gate.active == 1


async def test_refusals() -> None:
    gate = RouteGate(1, max_queue=1, max_queue_time=2.0)
    assert gate.refuse(1, perf=0) is None
    gate.active = 1
    gate._load.add(30.0)
    assert gate.refuse(1, perf=0) is None  # no perf measured: no estimate
    assert gate.refuse(1, perf=10) is GateRefusal.WAIT_TOO_LONG
    assert gate.refuse(1, perf=100) is None
    gate._waiters.append(asyncio.get_running_loop().create_future())
    assert gate.refuse(1, perf=100) is GateRefusal.QUEUE_FULL


async def test_queued_load_returns_to_exactly_zero_whatever_the_sizes() -> None:
    """Float sums drift: 1e16 + 1 - 1e16 - 1 is -1. The gate's load must not."""
    gate = RouteGate(None, max_queue=10, max_queue_time=None)
    sizes = (1e9, 0.1, 1e-6, 0.2, 123456.789, 1.0, 1e9 - 1)
    for size in sizes:
        async with gate.slot(size):
            assert gate.workload > 0
    assert gate.workload == 0.0
    async with gate.slot(1e9), gate.slot(1.0), gate.slot(0.3):
        pass
    assert gate.workload == 0.0
