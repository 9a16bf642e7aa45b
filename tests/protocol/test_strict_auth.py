"""Strict signatures: the canonical message, the verifier, the worker and the local autoscaler."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from pyworker.config import WorkerConfig
from pyworker.config.environment import Environment, InvalidEnvironment
from pyworker.devtools.local.autoscaler import LocalAutoscaler, build_parser
from pyworker.protocol.auth import AuthData, SignatureVerifier, Verdict
from pyworker.protocol.canonical import CanonicalError, canonical_number
from pyworker.protocol.keys import PrivateKey, load_public_key, sign_message
from pyworker.protocol.messages import PUBKEY_PATH
from pyworker.protocol.signing import SigningKey
from pyworker.protocol.strict import (
    DEFAULT_MAX_LIFETIME,
    DEFAULT_SKEW,
    ReplayCache,
    SignedRequest,
    StrictVerifier,
    canonical_message,
    strict_fields,
)
from pyworker.serving.compose import Worker, compose_worker
from pyworker.serving.server import RUNNER_OPTIONS
from tests.conftest import KeyPair, ModelServer, wait_until

NOW = 1_700_000_000.0
WORKER_URL = "http://127.0.0.1:4000"


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def strict_auth(
    key: PrivateKey,
    url: str = WORKER_URL,
    *,
    request_idx: int = 1,
    reqnum: int = 1,
    cost: float = 10.0,
    endpoint: str = "test",
    expires: float | None = None,
    now: float = NOW,
    **overrides: Any,
) -> dict[str, Any]:
    """auth_data as a strict autoscaler sends it: the reference fields plus the strict ones."""
    fields: dict[str, Any] = {
        "url": url,
        "endpoint": endpoint,
        "request_idx": request_idx,
        "reqnum": reqnum,
        "cost": cost,
    }
    expiry = now + 60 if expires is None else expires
    reference = SigningKey(key).sign(url)
    data = {
        **fields,
        "signature": reference,
        **strict_fields(key, SignedRequest(**fields, expires=expiry)),
    }
    data.update(overrides)
    return data


@pytest.fixture(scope="module")
def ed25519_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(params=["rsa", "ed25519"])
def any_key(
    request: pytest.FixtureRequest, keypair: KeyPair, ed25519_key: ed25519.Ed25519PrivateKey
) -> PrivateKey:
    return keypair.private if request.param == "rsa" else ed25519_key


def verifier_for(key: PrivateKey, clock: Clock | None = None, **options: Any) -> StrictVerifier:
    verifier = StrictVerifier(lambda: WORKER_URL, clock=clock or Clock(), **options)
    verifier.load_pem(public_pem(key))
    return verifier


# --- the canonical message -------------------------------------------------------------------


def test_canonical_message_is_compact_sorted_rfc8785_json() -> None:
    message = canonical_message(
        SignedRequest(
            url="http://1.2.3.4:5000",
            endpoint='my "llm" é',
            request_idx=7,
            reqnum=3,
            cost=10.0,
            expires=1700000060,
        )
    )
    assert message == (
        b'{"cost":10,"endpoint":"my \\"llm\\" \xc3\xa9","expires":1700000060,"reqnum":3,'
        b'"request_idx":7,"sig_v":1,"url":"http://1.2.3.4:5000"}'
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [  # RFC 8785 appendix B, and the values an autoscaler sends
        (0.0, "0"),
        (-0.0, "0"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (9007199254740992.0, "9007199254740992"),
        (1e21, "1e+21"),
        (1e20, "100000000000000000000"),
        (295147905179352830000.0, "295147905179352830000"),
        (333333333.33333329, "333333333.3333333"),
        (0.000001, "0.000001"),
        (1e-7, "1e-7"),
        (4.50, "4.5"),
        (2e-3, "0.002"),
        (1e-27, "1e-27"),
        (-1.5e300, "-1.5e+300"),
        (12.5, "12.5"),
        (1700000060, "1700000060"),
    ],
)
def test_numbers_are_written_as_ecmascript_does(value: float, text: str) -> None:
    assert canonical_number(value) == text


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 2**53, -(2**53), True])
def test_values_without_a_portable_form_are_refused(value: Any) -> None:
    with pytest.raises(CanonicalError):
        canonical_number(value)


def test_a_lone_surrogate_has_no_canonical_form() -> None:
    with pytest.raises(CanonicalError):
        canonical_message(
            SignedRequest(
                url="\ud800", endpoint="e", request_idx=1, reqnum=1, cost=1.0, expires=NOW
            )
        )


# --- keys --------------------------------------------------------------------------------------


def test_rsa_and_ed25519_keys_load_and_others_do_not(
    keypair: KeyPair, ed25519_key: ed25519.Ed25519PrivateKey
) -> None:
    load_public_key(keypair.pem)
    load_public_key(public_pem(ed25519_key))
    ec_pem = public_pem(ec.generate_private_key(ec.SECP256R1()))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="neither RSA nor Ed25519"):
        load_public_key(ec_pem)
    with pytest.raises(ValueError):
        load_public_key(b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    verifier = StrictVerifier()
    assert not verifier.has_key
    assert verifier.check(AuthData.model_validate(strict_auth(ed25519_key))) is Verdict.INVALID


# --- the verifier ------------------------------------------------------------------------------


def test_a_strict_auth_data_is_accepted_once(any_key: PrivateKey) -> None:
    verifier = verifier_for(any_key)
    auth = AuthData.model_validate(strict_auth(any_key))
    assert verifier.check(auth) is Verdict.ACCEPTED
    assert verifier.check(auth) is Verdict.REPLAYED
    assert verifier.check(auth) is not Verdict.ACCEPTED
    other = AuthData.model_validate(strict_auth(any_key, reqnum=2))
    assert (
        verifier.check(other) is Verdict.ACCEPTED
    )  # the same request routed again is another message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cost", 1000.0),
        ("endpoint", "other"),
        ("request_idx", 2),
        ("reqnum", 9),
        ("expires", NOW + 61),
        ("strict_signature", base64.b64encode(b"x" * 64).decode()),
    ],
)
def test_every_bound_field_is_covered(any_key: PrivateKey, field: str, value: Any) -> None:
    verifier = verifier_for(any_key)
    tampered = AuthData.model_validate({**strict_auth(any_key), field: value})
    assert verifier.check(tampered) is Verdict.INVALID
    assert len(verifier.replays) == 0


def test_the_url_must_be_this_workers(any_key: PrivateKey) -> None:
    verifier = verifier_for(any_key)
    elsewhere = strict_auth(any_key, url="http://127.0.0.1:4001")
    assert verifier.check(AuthData.model_validate(elsewhere)) is Verdict.WRONG_WORKER
    assert verifier.check(AuthData.model_validate(strict_auth(any_key, WORKER_URL + "/")))
    anywhere = StrictVerifier(clock=Clock())  # no audience: only the signature binds the url
    anywhere.load_pem(public_pem(any_key))
    assert anywhere.check(AuthData.model_validate(elsewhere)) is Verdict.ACCEPTED
    forged = {**elsewhere, "url": WORKER_URL}
    assert anywhere.check(AuthData.model_validate(forged)) is Verdict.INVALID


def test_expiry_with_a_clock_skew_allowance(keypair: KeyPair) -> None:
    clock = Clock()
    verifier = verifier_for(keypair.private, clock)
    late = AuthData.model_validate(strict_auth(keypair.private, expires=NOW - DEFAULT_SKEW + 1))
    assert verifier.check(late) is Verdict.ACCEPTED  # within the skew
    stale = AuthData.model_validate(strict_auth(keypair.private, expires=NOW - DEFAULT_SKEW - 1))
    assert verifier.check(stale) is Verdict.EXPIRED
    far = NOW + DEFAULT_MAX_LIFETIME + DEFAULT_SKEW + 1
    assert verifier.check(AuthData.model_validate(strict_auth(keypair.private, expires=far))) is (
        Verdict.TOO_LONG
    )
    fresh = AuthData.model_validate(strict_auth(keypair.private, reqnum=5))
    clock.now += 60 + DEFAULT_SKEW + 1
    assert verifier.check(fresh) is Verdict.EXPIRED


def test_reference_only_and_malformed_strict_fields_are_unsigned(keypair: KeyPair) -> None:
    verifier = verifier_for(keypair.private)
    reference = keypair.auth_data(url=WORKER_URL)
    assert verifier.check(AuthData.model_validate(reference)) is Verdict.UNSIGNED
    good = strict_auth(keypair.private)
    for broken in ({"expires": "soon"}, {"sig_v": "one"}, {"strict_signature": 12}):
        auth = AuthData.model_validate({**good, **broken})  # still a valid reference shape
        assert verifier.check(auth) is Verdict.UNSIGNED
    assert verifier.check(AuthData.model_validate({**good, "sig_v": 2})) is Verdict.UNSUPPORTED
    huge = {**good, "strict_signature": "A" * 5000}
    assert verifier.check(AuthData.model_validate(huge)) is Verdict.INVALID
    beyond = {**good, "request_idx": 2**60}  # no portable canonical form: no signer made it
    assert verifier.check(AuthData.model_validate(beyond)) is Verdict.INVALID


def test_another_keys_strict_signature_is_invalid(
    keypair: KeyPair, ed25519_key: ed25519.Ed25519PrivateKey
) -> None:
    verifier = verifier_for(keypair.private)
    auth = AuthData.model_validate(strict_auth(ed25519_key))
    assert verifier.check(auth) is Verdict.INVALID


def test_the_replay_cache_is_bounded_and_pruned_by_expiry(
    ed25519_key: ed25519.Ed25519PrivateKey,
) -> None:
    clock = Clock()
    verifier = verifier_for(ed25519_key, clock, replay_capacity=3, skew=0)
    for reqnum in range(3):
        auth = strict_auth(ed25519_key, reqnum=reqnum, expires=NOW + 10 + reqnum)
        assert verifier.check(AuthData.model_validate(auth)) is Verdict.ACCEPTED
    fourth = AuthData.model_validate(strict_auth(ed25519_key, reqnum=3, expires=NOW + 100))
    assert verifier.check(fourth) is Verdict.BUSY  # full of live entries: refuse, never forget
    assert len(verifier.replays) == 3
    clock.now = NOW + 10.5  # the first one expired: its entry may go
    assert verifier.check(fourth) is Verdict.ACCEPTED
    assert len(verifier.replays) == 3
    assert verifier.check(fourth) is Verdict.REPLAYED
    clock.now = NOW + 101
    verifier.replays.prune(clock.now)
    assert len(verifier.replays) == 0


def test_replay_cache_alone() -> None:
    cache = ReplayCache(capacity=2)
    assert cache.add(b"a", 5.0, now=0.0) and cache.add(b"b", 1.0, now=0.0)
    assert not cache.add(b"c", 9.0, now=0.5)
    assert cache.add(b"c", 9.0, now=2.0) and b"b" not in cache and b"a" in cache
    with pytest.raises(ValueError):
        ReplayCache(capacity=0)
    roomy = ReplayCache(capacity=1000)  # far from full: expired entries still go at once
    for second in range(50):
        assert roomy.add(bytes([second]), keep_until=second + 3.0, now=float(second))
        assert len(roomy) <= 4


def test_sign_message_round_trips_for_both_key_types(any_key: PrivateKey) -> None:
    verifier = verifier_for(any_key)
    fields: dict[str, Any] = {
        "url": WORKER_URL,
        "endpoint": "e",
        "request_idx": 4,
        "reqnum": 2,
        "cost": 0.25,
    }
    message = canonical_message(SignedRequest(**fields, expires=NOW + 5))
    signature = sign_message(any_key, message)
    auth = {**fields, "signature": "", "expires": NOW + 5, "sig_v": 1}
    accepted = AuthData.model_validate({**auth, "strict_signature": signature})
    assert verifier.check(accepted) is Verdict.ACCEPTED


# --- the environment ---------------------------------------------------------------------------


def test_the_strict_flag_and_its_contradictions() -> None:
    platform = {"REPORT_ADDR": "http://127.0.0.1:9", "CONTAINER_ID": "3"}
    assert not Environment.from_env(platform).strict_auth
    strict = Environment.from_env({**platform, "PYWORKER_STRICT_AUTH": "true"})
    assert strict.strict_auth and not strict.unsecured
    local_strict = Environment.from_env({"REPORT_ADDR": "http://127.0.0.1:9"} | _strict())
    assert local_strict.strict_auth and not local_strict.unsecured
    with pytest.raises(InvalidEnvironment, match="contradicts UNSECURED"):
        Environment.from_env({**platform, **_strict(), "UNSECURED": "true"})
    with pytest.raises(InvalidEnvironment, match="PYWORKER_STRICT_AUTH=true needs REPORT_ADDR"):
        Environment.from_env(_strict())
    with pytest.raises(InvalidEnvironment, match="not a boolean"):
        Environment.from_env({**platform, "PYWORKER_STRICT_AUTH": "maybe"})


def test_timeouts_and_report_interval_from_the_environment() -> None:
    environment = Environment.from_env(
        {
            "PYWORKER_REPORT_INTERVAL": "0.25",
            "PYWORKER_BODY_TIMEOUT": "5",
            "PYWORKER_KEEPALIVE_TIMEOUT": "7.5",
        }
    )
    assert environment.report_interval == 0.25
    assert environment.body_timeout == 5.0 and environment.keepalive_timeout == 7.5
    defaults = Environment.from_env({})
    assert (defaults.report_interval, defaults.body_timeout, defaults.keepalive_timeout) == (
        1.0,
        60.0,
        75.0,
    )
    for name in ("PYWORKER_REPORT_INTERVAL", "PYWORKER_BODY_TIMEOUT", "PYWORKER_KEEPALIVE_TIMEOUT"):
        with pytest.raises(InvalidEnvironment, match=name):
            Environment.from_env({name: "0"})
        with pytest.raises(InvalidEnvironment, match=name):
            Environment.from_env({name: "soon"})


def _strict() -> dict[str, str]:
    return {"PYWORKER_STRICT_AUTH": "true"}


# --- a strict worker ---------------------------------------------------------------------------


class StrictWorker:
    def __init__(self, worker: Worker, server: TestServer, session: aiohttp.ClientSession) -> None:
        self.worker = worker
        self.server = server
        self.session = session

    @property
    def url(self) -> str:
        return self.worker.url

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        address = str(self.server.make_url(path))
        async with self.session.post(address, json=body) as response:
            return response.status, await response.json(content_type=None)


StrictFactory = Callable[[PrivateKey], Awaitable[StrictWorker]]


@pytest.fixture
async def strict_worker(model_server: ModelServer) -> AsyncIterator[StrictFactory]:
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def start(key: PrivateKey, **environ: str) -> StrictWorker:
        pem = public_pem(key)

        async def pubkey(request: web.Request) -> web.Response:
            return web.Response(body=pem)

        keys = web.Application()
        keys.router.add_get(PUBKEY_PATH, pubkey)
        key_server = TestServer(keys, host="127.0.0.1")
        await key_server.start_server()
        cleanups.append(key_server.close)
        config = WorkerConfig.model_validate(
            {"model_server": {"base_url": model_server.url}, "routes": [{"path": "/echo"}]}
            | {"perf": 100.0}
        )
        address = str(key_server.make_url("")).rstrip("/")
        environment = Environment.from_env({"REPORT_ADDR": address, **_strict(), **environ})
        worker = compose_worker(config, environment)
        server = TestServer(worker.create_app(), host="127.0.0.1", **RUNNER_OPTIONS)
        await server.start_server()
        cleanups.append(server.close)
        session = aiohttp.ClientSession()
        cleanups.append(session.close)
        await wait_until(lambda: worker.status.ready)
        return StrictWorker(worker, server, session)

    yield start
    for cleanup in reversed(cleanups):
        await cleanup()


def body(auth: dict[str, Any], **payload: Any) -> dict[str, Any]:
    return {"auth_data": auth, "payload": payload}


async def test_a_strict_worker_serves_each_auth_data_once(
    strict_worker: StrictFactory, any_key: PrivateKey, model_server: ModelServer
) -> None:
    worker = await strict_worker(any_key)
    assert isinstance(worker.worker.verifier, StrictVerifier)
    now = time.time()
    auth = strict_auth(any_key, worker.url, request_idx=11, now=now)
    assert await worker.post("/echo", body(auth, n=1)) == (200, {"received": {"n": 1}})
    refused = [
        (auth, "auth_data already used"),
        (strict_auth(any_key, worker.url, request_idx=12, expires=now - 120), "auth_data expired"),
        (strict_auth(any_key, "http://10.0.0.1:1", request_idx=13, now=now), "another worker"),
        ({**strict_auth(any_key, worker.url, request_idx=14, now=now), "cost": 1}, "invalid"),
        ({**strict_auth(any_key, worker.url, request_idx=15, now=now), "sig_v": None}, "strict"),
    ]
    for auth_data, error in refused:
        status, answer = await worker.post("/echo", body(auth_data, n=2))
        assert status == 401 and error in answer["error"], answer
    ledger = worker.worker.ledger
    assert [record.request_idx for record in ledger.take_finished()] == [11]
    assert ledger.interval().received == 1
    assert model_server.recorder.payloads == [{"n": 1}]


async def test_a_strict_worker_refuses_reference_auth_data(
    strict_worker: StrictFactory, keypair: KeyPair
) -> None:
    worker = await strict_worker(keypair.private)
    status, answer = await worker.post("/echo", body(keypair.auth_data(url=worker.url)))
    assert status == 401 and answer["error"].startswith("strict signature required")


async def test_a_full_replay_cache_is_503_not_401(
    strict_worker: StrictFactory, ed25519_key: ed25519.Ed25519PrivateKey
) -> None:
    worker = await strict_worker(ed25519_key)
    verifier = worker.worker.verifier
    assert isinstance(verifier, StrictVerifier)
    verifier.replays.capacity = 1
    now = time.time()
    first = strict_auth(ed25519_key, worker.url, request_idx=1, now=now)
    assert (await worker.post("/echo", body(first)))[0] == 200
    second = strict_auth(ed25519_key, worker.url, request_idx=2, now=now)
    status, answer = await worker.post("/echo", body(second))
    assert status == 503 and "retry" in answer["error"]
    assert worker.worker.ledger.interval().received == 1


async def test_strict_session_create_consumes_its_auth_data(
    strict_worker: StrictFactory, keypair: KeyPair
) -> None:
    worker = await strict_worker(keypair.private)
    auth = strict_auth(keypair.private, worker.url, request_idx=40, now=time.time())
    status, created = await worker.post("/session/create", body(auth, lifetime=30))
    assert status == 201
    assert (await worker.post("/session/create", body(auth, lifetime=30)))[0] == 401
    query = {"session_id": created["session_id"], "session_auth": auth}
    assert (await worker.post("/session/get", query))[0] == 200  # session_auth is not re-spent
    assert (await worker.post("/session/end", query))[0] == 200


# --- the local autoscaler ----------------------------------------------------------------------


async def test_the_local_autoscaler_signs_strictly_and_for_reference_workers(
    keypair: KeyPair,
) -> None:
    autoscaler = LocalAutoscaler("demo", key=SigningKey(keypair.private))
    report = {"id": 1, "url": WORKER_URL, "max_perf": 10.0, "loadtime": 1.0}
    autoscaler.record_status(report)
    answer = autoscaler.route(cost=3.5)
    assert answer["sig_v"] == 1 and answer["expires"] > time.time()
    auth = AuthData.model_validate(answer)
    strict = StrictVerifier(lambda: WORKER_URL)
    strict.load_pem(autoscaler.public_pem)
    assert strict.check(auth) is Verdict.ACCEPTED
    reference = SignatureVerifier()  # a reference worker still accepts the same answer
    reference.load_pem(autoscaler.public_pem)
    assert reference.check(auth) is Verdict.ACCEPTED
    plain = LocalAutoscaler("demo", key=autoscaler.key, strict=False)
    plain.record_status(report)
    assert "strict_signature" not in plain.route(cost=1.0)
    assert build_parser().parse_args(["--reference-only"]).reference_only


def test_an_ed25519_signing_key_signs_strictly_only(
    ed25519_key: ed25519.Ed25519PrivateKey,
) -> None:
    key = SigningKey(ed25519_key)
    assert key.sign(WORKER_URL) == ""
    signed = SignedRequest(
        url=WORKER_URL, endpoint="e", request_idx=1, reqnum=1, cost=1.0, expires=NOW + 1
    )
    fields = strict_fields(key.private_key, signed)
    auth = AuthData.model_validate(
        {"url": WORKER_URL, "endpoint": "e", "request_idx": 1, "reqnum": 1, "cost": 1.0}
        | {"signature": "", **fields}
    )
    verifier = verifier_for(ed25519_key)
    assert verifier.check(auth) is Verdict.ACCEPTED
    assert SigningKey.generate_ed25519().public_pem.startswith(b"-----BEGIN PUBLIC KEY-----")
