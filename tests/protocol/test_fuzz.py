"""Property-based tests and a fuzz harness: hostile input never makes a 5xx, a crash, or growth.

Covered: the envelope and auth_data parsers, the strict verifier and its canonical message, the
request and session routes of a running worker (over HTTP, raw bytes included) and the log
follower. The worker runs on an event loop in a thread, so that Hypothesis drives it from plain
synchronous tests; after each run the worker's tables and caches are checked to be bounded.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import math
import re
import socket
import threading
import time
from base64 import b64encode
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pyworker.config import WorkerConfig
from pyworker.config.environment import Environment
from pyworker.lifecycle.logfollow import LogFollower, _LineSplitter
from pyworker.protocol.auth import AuthData, SignatureVerifier, Verdict
from pyworker.protocol.canonical import canonical_number
from pyworker.protocol.envelope import Envelope, EnvelopeError, parse_envelope
from pyworker.protocol.strict import SignedRequest, StrictVerifier, canonical_message, strict_fields
from pyworker.serving.compose import Worker, compose_worker
from pyworker.serving.server import RUNNER_OPTIONS
from tests.conftest import KeyPair
from tests.support.fake_autoscaler import FakeAutoscaler

T = TypeVar("T")
STRICT_KEY = ed25519.Ed25519PrivateKey.generate()
STRICT_PEM = STRICT_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FEW = settings(FUZZ, max_examples=60)
MAX_SESSIONS = 5
ROUTES = ("/echo", "/cost", "/field")
SESSION_ROUTES = ("/session/create", "/session/get", "/session/health", "/session/end")

# --- strategies --------------------------------------------------------------------------------


def text(max_size: int) -> st.SearchStrategy[str]:
    """Text that can travel as UTF-8; lone surrogates are fuzzed as raw bytes instead."""
    return st.text(st.characters(codec="utf-8"), max_size=max_size)


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text(12)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(text(8), children, max_size=4)
    ),
    max_leaves=12,
)
close_routes = st.sampled_from(
    ["/closed", "http://127.0.0.1:1/x", "//evil.example/x", "/../x", "", "/a b", "/" + "x" * 600]
) | text(20)


def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """One of `choices`, each drawn in proportion to its weight."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda index: table[index])


payloads = weighted(
    (
        4,
        st.fixed_dictionaries(
            {},
            optional={
                "n": weighted((3, st.integers(0, 100)), (1, json_values)),
                "lifetime": weighted(
                    (3, st.floats(min_value=0.5, max_value=600)), (1, json_values)
                ),
                "on_close_route": weighted((3, st.just("/closed")), (1, close_routes)),
                "on_close_payload": st.dictionaries(text(5), json_values, max_size=3),
                "prompt": text(30),
            },
        ),
    ),
    (1, st.dictionaries(text(8), json_values, max_size=4)),
    (1, json_values),
)


def json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


# --- a worker on a background event loop -----------------------------------------------------


class Background:
    """An event loop in a daemon thread; `run` executes a coroutine there and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class FuzzedWorker:
    def __init__(self, background: Background, keypair: KeyPair) -> None:
        self.background = background
        self.keypair = keypair
        self.closed_notices: list[str] = []
        self.runners: list[web.AppRunner] = []
        self.worker: Worker | None = None
        self.autoscaler: FakeAutoscaler | None = None
        self.port = 0
        self.signature = ""
        self.url = ""

    async def start(self) -> None:
        model = web.Application()
        model.router.add_post("/{tail:.*}", self._model_answer)
        model.router.add_get("/health", self._model_health)
        model_url = await self._serve(model)
        self.autoscaler = FakeAutoscaler(self.keypair.pem)
        await self.autoscaler.start()
        config = WorkerConfig.model_validate(
            {
                "model_server": {"base_url": model_url},
                "routes": [
                    {"path": "/echo"},
                    {"path": "/cost", "workload": "cost"},
                    {"path": "/field", "workload": "n"},
                ],
                "perf": 100.0,
                "max_body_size": 16 * 1024,
                "sessions": {"max_sessions": MAX_SESSIONS, "max_lifetime": 3600},
            }
        )
        environment = Environment.from_env(
            {
                "REPORT_ADDR": self.autoscaler.url,
                "CONTAINER_ID": "3",
                "UNSECURED": "false",
                "PYWORKER_REPORT_INTERVAL": "0.05",
                "PYWORKER_BODY_TIMEOUT": "2",
            }
        )
        self.worker = compose_worker(config, environment)
        worker_url = await self._serve(self.worker.create_app(), **RUNNER_OPTIONS)
        self.port = int(worker_url.rsplit(":", 1)[1])
        self.url = self.worker.url
        self.signature = self.keypair.sign(self.url)
        deadline = time.monotonic() + 20
        while not self.worker.status.ready:
            assert time.monotonic() < deadline, "fuzzed worker never became ready"
            await asyncio.sleep(0.01)

    async def _serve(self, app: web.Application, **options: Any) -> str:
        runner = web.AppRunner(app, **options)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    async def _model_answer(self, request: web.Request) -> web.Response:
        await request.read()
        if request.path != "/echo" and request.path.startswith("/close"):
            self.closed_notices.append(request.path)
        return web.json_response({"ok": True})

    async def _model_health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def stop(self) -> None:
        for runner in reversed(self.runners):
            await runner.cleanup()
        if self.autoscaler is not None:
            await self.autoscaler.close()

    # --- clients, from the test thread ---------------------------------------------------
    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            connection.request("POST", path, body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def valid_auth(self, request_idx: int, cost: float | int | str, **extra: Any) -> dict[str, Any]:
        auth = {
            "url": self.url,
            "endpoint": "fuzz",
            "reqnum": request_idx,
            "request_idx": request_idx,
            "cost": cost,
            "signature": self.signature,
        }
        return auth | extra

    def state(self) -> Worker:
        assert self.worker is not None
        return self.worker


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[FuzzedWorker]:
    background = Background()
    target = FuzzedWorker(background, KeyPair())
    try:
        background.run(target.start())
        yield target
    finally:
        background.run(target.stop())
        background.close()


def assert_bounded(fuzzed: FuzzedWorker) -> None:
    """After many hostile inputs: nothing in flight, every table within its bound."""
    worker = fuzzed.state()

    def settled() -> bool:
        gates_idle = all(gate.active == 0 and gate.waiting == 0 for gate in worker.gates.values())
        return gates_idle and worker.ledger.in_progress == len(worker.sessions)

    deadline = time.monotonic() + 10
    while not fuzzed.background.run(_check(settled)):
        assert time.monotonic() < deadline, "requests still in flight after the fuzz"
        time.sleep(0.05)
    assert len(worker.sessions) <= MAX_SESSIONS
    verifier = worker.verifier
    assert isinstance(verifier, SignatureVerifier)
    assert len(verifier._cache) <= verifier._cache_size
    assert worker.ledger.finished_waiting <= 10_000
    assert math.isfinite(worker.ledger.current_load) and worker.ledger.current_load >= 0
    assert all(path.startswith("/closed") for path in fuzzed.closed_notices)


async def _check(predicate: Callable[[], bool]) -> bool:
    return predicate()


# --- the request routes ------------------------------------------------------------------------


def test_request_routes_never_answer_5xx(fuzzed: FuzzedWorker) -> None:
    names = st.sampled_from(["cost", "endpoint", "reqnum", "request_idx", "signature", "url"])
    valid = st.builds(
        fuzzed.valid_auth,
        request_idx=st.integers(min_value=0, max_value=2**63 - 1),
        cost=st.floats(min_value=0, max_value=1e9) | st.integers(0, 10**6) | st.just("12"),
    )
    mutated = st.builds(lambda auth, name, value: auth | {name: value}, valid, names, json_values)
    forged = st.builds(
        lambda auth, signature: auth | {"signature": signature},
        valid,
        text(30) | st.binary(max_size=256).map(lambda raw: b64encode(raw).decode()),
    )
    auth_strategy = weighted(
        (6, valid),
        (1, forged),
        (1, mutated),
        (1, st.dictionaries(names, json_values)),
        (1, json_values),
    )
    session_ids = weighted((6, st.none()), (1, text(10)), (1, json_values))
    envelope = st.fixed_dictionaries(
        {"auth_data": auth_strategy, "payload": payloads}, optional={"session_id": session_ids}
    )
    bodies = weighted((5, envelope.map(json_bytes)), (1, st.binary(max_size=200)))

    @FUZZ
    @given(path=st.sampled_from(ROUTES), body=bodies)
    def run(path: str, body: bytes) -> None:
        status, answer = fuzzed.post(path, body)
        event(f"HTTP {status}")
        assert status < 500, (status, answer)
        assert status in (200, 401, 410, 413, 422, 429), (status, answer)
        if status != 200:
            assert "error" in orjson.loads(answer)

    run()
    assert_bounded(fuzzed)


def test_session_routes_never_answer_5xx(fuzzed: FuzzedWorker) -> None:
    opened: dict[str, dict[str, Any]] = {}

    @FUZZ
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        route = data.draw(st.sampled_from(SESSION_ROUTES))
        if route == "/session/create":
            valid = st.builds(fuzzed.valid_auth, st.integers(0, 10**9), st.integers(0, 100))
            auth = data.draw(valid | valid | st.dictionaries(text(8), json_values, max_size=4))
            document: Any = {"auth_data": auth, "payload": data.draw(payloads)}
        else:
            # The same draws whatever is open, so that Hypothesis can replay an example.
            pick, use_known, other_id = data.draw(
                st.tuples(st.integers(0, 1000), st.booleans(), text(300))
            )
            known = sorted(opened)
            session_id = known[pick % len(known)] if use_known and known else other_id
            use_right, other_auth = data.draw(st.tuples(st.booleans(), json_values))
            right = opened.get(session_id)
            session_auth = right if use_right and right is not None else other_auth
            document = {"session_id": session_id, "session_auth": session_auth}
        body = data.draw(st.sampled_from([json_bytes(document)] * 3) | st.binary(max_size=100))
        status, answer = fuzzed.post(route, body)
        event(f"{route} HTTP {status}")
        assert status < 500, (route, status, answer)
        parsed = orjson.loads(answer)
        if route == "/session/create" and status == 201:
            opened[parsed["session_id"]] = json.loads(body)["auth_data"]
        if route == "/session/end" and status == 200:
            opened.pop(parsed["removed_session"], None)

    run()
    assert_bounded(fuzzed)


def test_malformed_http_never_answers_5xx_and_the_server_stays_up(fuzzed: FuzzedWorker) -> None:
    methods = st.sampled_from([b"GET", b"POST", b"PUT", b"\x16\x03\x01", b"", b"G\x00T"])
    targets = st.sampled_from([b"/health", b"/echo", b"/session/end", b"*", b""]) | st.binary(
        max_size=30
    )
    headers = st.lists(
        st.tuples(st.binary(max_size=20), st.binary(max_size=40)).map(
            lambda h: h[0] + b": " + h[1]
        ),
        max_size=5,
    )
    requests = st.builds(
        lambda method, target, lines, body: (
            method
            + b" "
            + target
            + b" HTTP/1.1\r\n"
            + b"".join(line + b"\r\n" for line in lines)
            + b"\r\n"
            + body
        ),
        methods,
        targets,
        headers,
        st.binary(max_size=50),
    ) | st.binary(max_size=300)

    @settings(FUZZ, max_examples=150)
    @given(raw=requests)
    def run(raw: bytes) -> None:
        with socket.create_connection(("127.0.0.1", fuzzed.port), timeout=10) as connection:
            connection.sendall(raw)
            connection.shutdown(socket.SHUT_WR)
            answer = b""
            try:
                while chunk := connection.recv(65536):
                    answer += chunk
            except ConnectionResetError:
                pass
        for status in re.findall(rb"HTTP/1\.[01] (\d{3})", answer):
            assert int(status) < 500, answer[:300]

    run()
    status, _ = fuzzed.post(
        "/echo", json_bytes({"auth_data": fuzzed.valid_auth(1, 1), "payload": {}})
    )
    assert status == 200
    assert_bounded(fuzzed)


# --- the parsers ---------------------------------------------------------------------------------


@FUZZ
@given(body=st.binary(max_size=300) | json_values.map(json_bytes))
def test_the_envelope_parser_only_ever_raises_envelope_error(body: bytes) -> None:
    try:
        envelope = parse_envelope(body)
    except EnvelopeError as error:
        orjson.dumps(error.body())  # the 422 answer can always be written
        return
    assert isinstance(envelope, Envelope) and isinstance(envelope.payload, dict)


@FUZZ
@given(
    raw=st.dictionaries(
        st.sampled_from(
            [
                *("cost", "endpoint", "reqnum", "request_idx", "signature", "url"),
                *("expires", "sig_v", "strict_signature", "extra"),
            ]
        ),
        json_values,
    )
)
def test_auth_data_parsing_and_both_verifiers_never_crash(raw: dict[str, Any]) -> None:
    try:
        auth = AuthData.model_validate(raw)
    except ValidationError:
        return
    strict = StrictVerifier(clock=lambda: 1e9)
    strict.load_pem(STRICT_PEM)
    assert strict.check(auth) in set(Verdict)
    assert len(strict.replays) == 0  # nothing unsigned is remembered
    reference = SignatureVerifier()
    assert reference.check(auth) is Verdict.INVALID  # no key: nothing verifies


@FUZZ
@given(value=st.floats(allow_nan=False, allow_infinity=False))
def test_canonical_numbers_round_trip(value: float) -> None:
    text = canonical_number(value)
    assert float(text) == value
    assert float(json.loads(text)) == value  # JSON readers agree, int or float
    assert text == canonical_number(float(text))  # a fixed point: one text per number


@FUZZ
@given(
    url=st.text(max_size=40),
    endpoint=st.text(max_size=20),
    request_idx=st.integers(-(2**53) + 1, 2**53 - 1),
    reqnum=st.integers(0, 2**53 - 1),
    cost=st.floats(min_value=0, max_value=1e12),
    expires=st.integers(0, 2**40) | st.floats(min_value=0, max_value=1e12),
)
def test_the_canonical_message_is_json_of_exactly_the_signed_fields(
    url: str, endpoint: str, request_idx: int, reqnum: int, cost: float, expires: float
) -> None:
    surrogate = re.compile("[\ud800-\udfff]")
    if surrogate.search(url + endpoint):
        return
    signed = SignedRequest(url, endpoint, request_idx, reqnum, cost, expires)
    message = canonical_message(signed)
    document = json.loads(message)
    assert list(document) == sorted(document)
    assert document == {
        "cost": cost,
        "endpoint": endpoint,
        "expires": expires,
        "reqnum": reqnum,
        "request_idx": request_idx,
        "sig_v": 1,
        "url": url,
    }
    assert b" " not in message.replace(json.dumps(url, ensure_ascii=False).encode(), b"").replace(
        json.dumps(endpoint, ensure_ascii=False).encode(), b""
    )


def test_the_strict_replay_cache_stays_bounded_under_a_stream_of_requests() -> None:
    clock = [1e9]
    verifier = StrictVerifier(lambda: "http://w:1", clock=lambda: clock[0], replay_capacity=40)
    verifier.load_pem(STRICT_PEM)
    accepted: list[AuthData] = []

    @FUZZ
    @given(
        request_idx=st.integers(0, 2**40),
        lifetime=st.floats(min_value=-60, max_value=400),
        advance=st.floats(min_value=0, max_value=5),
        replay=st.booleans(),
    )
    def run(request_idx: int, lifetime: float, advance: float, replay: bool) -> None:
        clock[0] += advance
        if replay and accepted:
            assert verifier.check(accepted[-1]) in (Verdict.REPLAYED, Verdict.EXPIRED)
            return
        fields: dict[str, Any] = {
            "url": "http://w:1",
            "endpoint": "e",
            "request_idx": request_idx,
            "reqnum": 1,
            "cost": 1.0,
        }
        expires = clock[0] + lifetime
        auth = AuthData.model_validate(
            {
                **fields,
                "signature": "",
                **strict_fields(STRICT_KEY, SignedRequest(**fields, expires=expires)),
            }
        )
        verdict = verifier.check(auth)
        fresh = expires + verifier.skew >= clock[0]
        in_window = expires <= clock[0] + verifier.max_lifetime + verifier.skew
        if not fresh:
            assert verdict is Verdict.EXPIRED
        elif not in_window:
            assert verdict is Verdict.TOO_LONG
        else:
            assert verdict in (Verdict.ACCEPTED, Verdict.REPLAYED, Verdict.BUSY)
        if verdict is Verdict.ACCEPTED:
            accepted.append(auth)
            del accepted[:-5]
            assert all(until >= clock[0] for until in verifier.replays._until.values())
        replays = verifier.replays
        assert len(replays) <= replays.capacity
        assert len(replays._by_expiry) == len(replays._until)

    run()


# --- the log follower ----------------------------------------------------------------------------

MAX_LINE = 24
log_content = st.lists(
    st.sampled_from([b"\n", b"\r", b"\r\n", b"\x00", b" ", b"\xff\xfe", "é".encode()])
    | st.binary(max_size=40)
    | text(30).map(str.encode),
    max_size=20,
).map(b"".join)


def expected_lines(content: bytes, max_line: int = MAX_LINE) -> list[str]:
    """What the follower must yield for `content` followed by a line end: the oracle."""
    lines = []
    for raw in re.split(rb"\r\n|\r|\n", content + b"\n")[:-1]:
        text = raw[:max_line].replace(b"\x00", b"")
        if text.strip():
            lines.append(text.decode("utf-8", errors="replace"))
    return lines


@FUZZ
@given(content=log_content, cuts=st.lists(st.integers(0, 400), max_size=10))
def test_line_splitting_does_not_depend_on_where_reads_end(content: bytes, cuts: list[int]) -> None:
    def split(pieces: list[bytes]) -> list[tuple[bytes, bool]]:
        splitter = _LineSplitter(MAX_LINE)
        lines: list[tuple[bytes, bool]] = []
        for piece in pieces:
            lines.extend(splitter.feed(piece))
            assert len(splitter._pending) <= MAX_LINE  # never more than one line held
        lines.extend(splitter.flush())
        return [(line, cut) for line, cut in lines if line]

    bounds = sorted({0, len(content), *(cut for cut in cuts if cut < len(content))})
    pieces = [content[start:end] for start, end in itertools.pairwise(bounds)]
    assert split(pieces) == split([content])


@FEW
@given(content=log_content, cuts=st.lists(st.integers(0, 400), max_size=6))
def test_the_follower_yields_each_line_once_from_a_file_written_in_pieces(
    tmp_path_factory: pytest.TempPathFactory, content: bytes, cuts: list[int]
) -> None:
    path = tmp_path_factory.mktemp("log") / "model.log"
    bounds = sorted({0, len(content), *(cut for cut in cuts if cut < len(content))})
    pieces = [content[start:end] for start, end in itertools.pairwise(bounds)]
    sentinel = "END-OF-TEST"
    lines = asyncio.run(_follow(path, [*pieces, f"\n{sentinel}\n".encode()], sentinel))
    assert lines == [*expected_lines(content), sentinel]


async def _follow(path: Path, pieces: list[bytes], sentinel: str) -> list[str]:
    follower = LogFollower(path, poll_interval=0.002, max_line=MAX_LINE, chunk_size=7)
    lines: list[str] = []

    async def consume() -> None:
        async for line in follower.lines():
            lines.append(line)
            if line == sentinel:
                return

    consumer = asyncio.create_task(consume())
    for piece in pieces:
        await asyncio.to_thread(_append, path, piece)
        await asyncio.sleep(0)
    await asyncio.wait_for(consumer, 10)
    assert follower.stats.lines_read == len(lines)
    return lines


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as log:
        log.write(data)
