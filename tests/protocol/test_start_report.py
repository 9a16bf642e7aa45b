"""The start report trusts nothing its addresses tell it (pyworker.protocol.messages.post).

Run by file path from a bare python, as scripts/on_start.sh runs it: a `REPORT_ADDR` entry
that redirects, or answers without end, is a report not delivered there, and the next entry
still gets it; the token never reaches a host the list does not name. `post` gives up at its
deadline however slowly a host answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from pyworker.protocol import messages
from tests.protocol.test_messages import ENVIRON, MESSAGES
from tests.support.fake_signer import write_certificate
from tests.support.recording_host import Handler, RecordingHost, answer_ok, endless, redirect_to


async def report_from_bare_python(report_addr: str, message: str) -> str:
    """Run messages.py as on_start.sh does; what it logged (it must exit 0 within 30 s)."""
    environ = {"PATH": os.environ.get("PATH", "")} | ENVIRON | {"REPORT_ADDR": report_addr}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-S", str(MESSAGES), message,
        env=environ, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, logged = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, logged
    return logged.decode(errors="replace")


def reports_received(host: RecordingHost) -> list[dict[str, object]]:
    assert all(request[:2] == ("POST", "/worker_status/") for request in host.requests)
    return [json.loads(request[3]) for request in host.requests]


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
async def test_a_redirect_is_not_followed_and_the_next_address_gets_the_report_once(
    hosts: Callable[[Handler], Awaitable[RecordingHost]], code: int
) -> None:
    elsewhere = await hosts(answer_ok)
    redirecting = await hosts(redirect_to(lambda: elsewhere.url, code))
    backup = await hosts(answer_ok)

    logged = await report_from_bare_python(f"{redirecting.url}, {backup.url}", "no GPU")

    assert elsewhere.requests == []  # never the token to where the 3xx points
    assert len(redirecting.requests) == 1
    [report] = reports_received(backup)
    assert report["error_msg"] == "no GPU" and report["mtoken"] == "secret-token"
    assert f"HTTP {code} (a redirect, not followed)" in logged
    assert "secret-token" not in logged


async def test_an_endless_answer_is_cut_at_the_bound_and_the_next_address_gets_the_report(
    hosts: Callable[[Handler], Awaitable[RecordingHost]],
) -> None:
    sent: list[int] = []
    flood = await hosts(endless(sent))
    backup = await hosts(answer_ok)

    await report_from_bare_python(f"{flood.url},{backup.url}", "weights missing")

    assert len(flood.requests) == 1
    [report] = reports_received(backup)
    assert report["error_msg"] == "weights missing"
    for _ in range(100):  # the flood's handler notes its total once it sees the reader gone
        if sent:
            break
        await asyncio.sleep(0.1)
    assert sent and sent[0] < 16 * 1024 * 1024  # the reader left at the bound, not at the end


async def trickle(head: bytes, writer: asyncio.StreamWriter) -> bool:
    """Write `head`, then a byte every 50 ms for up to 20 s: an answer that never completes.
    Whether the reader left before the 20 s were up."""
    try:
        writer.write(head)
        for _ in range(400):
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"x")
    except ConnectionError:
        return True
    finally:
        writer.close()
    return False


def trust_only(cert_file: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """The server side of a TLS host whose self-signed certificate `post` is made to trust."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, cert_file.with_suffix(".key"))
    client = ssl.create_default_context(cafile=str(cert_file))
    client.check_hostname = False  # the certificate names pyworker.vast.ai, not 127.0.0.1
    monkeypatch.setattr(ssl, "create_default_context", lambda: client)
    return server


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-Slow: ",  # headers that never end
        b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n",  # a body that never ends
    ],
    ids=["headers", "body"],
)
async def test_post_gives_up_at_its_deadline_on_a_host_that_answers_a_byte_at_a_time(
    head: bytes, scheme: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each read gets a byte well within the timeout: only a deadline for the call ends it."""
    reader_left: list[bool] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        reader_left.append(await trickle(head, writer))

    tls = trust_only(write_certificate(tmp_path)[0], monkeypatch) if scheme == "https" else None
    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(TimeoutError, match=r"no whole answer within 0\.5 s"):
            await asyncio.to_thread(
                messages.post, f"{scheme}://127.0.0.1:{port}/worker_status/", b"{}", {}, timeout=0.5
            )
        for _ in range(100):
            if reader_left:
                break
            await asyncio.sleep(0.1)
        assert reader_left == [True]  # the call ended at its deadline, not when the host did
    finally:
        server.close()
        await server.wait_closed()


async def test_post_answers_the_status_and_a_bounded_body(
    hosts: Callable[[Handler], Awaitable[RecordingHost]],
) -> None:
    host = await hosts(answer_ok)

    status, body = await asyncio.to_thread(
        messages.post, host.url + "/x?y=1", b"{}", {"Content-Type": "text/plain"}, timeout=5
    )

    assert (status, json.loads(body)) == (200, {"ok": True})
    [(method, path, headers, sent)] = host.requests
    assert (method, path, sent) == ("POST", "/x", b"{}")
    assert headers["Content-Type"] == "text/plain"
    assert headers["Accept-Encoding"] == "identity"
