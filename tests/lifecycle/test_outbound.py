"""Calls to the autoscaler's addresses trust nothing they are told (pyworker.lifecycle.outbound).

Fake autoscalers on loopback redirect to another host, answer without end, or fail; the public
key is fetched over REPORT_ADDR as reports are: each address in turn, a redirect never
followed, an answer read up to a bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from pyworker.lifecycle import outbound
from pyworker.lifecycle.public_key import KeyFetch, fetch_public_key
from pyworker.protocol.auth import AuthData, SignatureVerifier, Verdict
from pyworker.protocol.messages import PUBKEY_PATH
from tests.conftest import KeyPair
from tests.support.fake_autoscaler import FakeAutoscaler
from tests.support.recording_host import Handler, RecordingHost, endless, redirect_to


def signed_by(verifier: SignatureVerifier, keypair: KeyPair) -> bool:
    """Whether the verifier's key is `keypair`'s: it accepts that pair's signature."""
    url = "http://127.0.0.1:9"
    auth = AuthData(
        cost=1, endpoint="e", reqnum=1, request_idx=1, url=url, signature=keypair.sign(url)
    )
    return verifier.check(auth) is Verdict.ACCEPTED


async def fetch(addresses: list[str], verifier: SignatureVerifier, key: KeyFetch) -> None:
    async with outbound.session() as session:
        await asyncio.wait_for(
            fetch_public_key(session, addresses, verifier, key, first_delay=0.01), 20
        )


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_the_public_key_is_never_taken_from_where_a_redirect_points(
    keypair: KeyPair, hosts: Callable[[Handler], Awaitable[RecordingHost]], status: int
) -> None:
    impostor_pair = KeyPair()

    async def impostor_key(request: web.Request) -> web.Response:
        return web.Response(body=impostor_pair.pem)

    impostor = await hosts(impostor_key)
    redirector = await hosts(redirect_to(lambda: impostor.url, status))
    async with FakeAutoscaler(keypair.pem) as second:
        verifier, key = SignatureVerifier(), KeyFetch()
        await fetch([redirector.url, second.url], verifier, key)
    assert impostor.requests == []
    assert [(method, path) for method, path, _, _ in redirector.requests] == [("GET", "/pubkey/")]
    assert signed_by(verifier, keypair) and not signed_by(verifier, impostor_pair)
    assert key.loaded.is_set() and not key.failed.is_set()  # the round found it: no error


async def test_an_endless_key_answer_is_cut_at_the_bound_and_the_next_address_serves(
    keypair: KeyPair, hosts: Callable[[Handler], Awaitable[RecordingHost]]
) -> None:
    sent: list[int] = []
    flood = await hosts(endless(sent))
    async with FakeAutoscaler(keypair.pem) as second:
        verifier, key = SignatureVerifier(), KeyFetch()
        await fetch([flood.url, second.url], verifier, key)
    assert signed_by(verifier, keypair)
    await asyncio.wait_for(_until(lambda: bool(sent)), 10)
    assert sent[0] < 16 * 1024 * 1024  # the reader left at the bound, not at the end


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


async def test_a_failed_round_says_why_then_the_key_loads_when_it_comes(
    keypair: KeyPair, hosts: Callable[[Handler], Awaitable[RecordingHost]]
) -> None:
    async def unavailable(request: web.Request) -> web.Response:
        return web.Response(status=503)

    first = await hosts(unavailable)
    async with FakeAutoscaler(b"not a key") as second:
        verifier, key = SignatureVerifier(), KeyFetch()
        async with outbound.session() as session:
            task = asyncio.ensure_future(
                fetch_public_key(session, [first.url, second.url], verifier, key, first_delay=0.01)
            )
            try:
                await asyncio.wait_for(key.failed.wait(), 10)
                assert f"{first.url}/pubkey/: HTTP 503" in key.problem
                assert f"{second.url}/pubkey/: " in key.problem and not key.loaded.is_set()
                second.pem = keypair.pem
                await asyncio.wait_for(task, 10)
            finally:
                task.cancel()
    assert key.loaded.is_set() and signed_by(verifier, keypair)
    assert len(first.requests) >= 2  # every round asks the first address first


async def test_fetch_retries_with_backoff_until_the_key_loads(keypair: KeyPair) -> None:
    attempts = 0

    async def pubkey(request: web.Request) -> web.Response:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            return web.Response(status=503)
        return web.Response(body=keypair.pem)

    app = web.Application()
    app.router.add_get(PUBKEY_PATH, pubkey)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    verifier = SignatureVerifier()
    try:
        async with aiohttp.ClientSession() as session:
            base = str(server.make_url("")).rstrip("/")
            await asyncio.wait_for(
                fetch_public_key(session, [base], verifier, first_delay=0.01), timeout=10
            )
    finally:
        await server.close()
    assert attempts == 3 and verifier.has_key
