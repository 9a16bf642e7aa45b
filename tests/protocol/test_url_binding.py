"""A signature binds to this worker: auth_data signed for another worker's url is refused.

The worker's public url (PUBLIC_IPADDR and VAST_TCP_PORT_<port> in the tests' fixture) is
http://127.0.0.1:1, which `KeyPair.auth_data` signs by default.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from pyworker.config import WorkerConfig
from pyworker.config.environment import Environment
from pyworker.protocol.auth import (
    MAX_CACHED_PAIR,
    MAX_URL,
    AuthData,
    SignatureVerifier,
    Verdict,
    _cached_address,
    same_worker,
    worker_address,
)
from pyworker.serving.compose import Worker, compose_worker
from pyworker.serving.server import announce_address
from tests.conftest import KeyPair, ModelServer, WorkerFactory

OWN = "http://127.0.0.1:1"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.2:1",  # another host
        "http://localhost:1",  # another name for it: the autoscaler signs one address
        "http://127.0.0.1:2",  # another port
        "https://127.0.0.1:1",  # another scheme
        "http://127.0.0.1",  # port 80
        "http://127.0.0.1:1@evil:1",  # userinfo: the host is evil
        "127.0.0.1:1",  # no scheme
        "http://127.0.0.1:99999",  # no such port
        "",
    ],
)
async def test_a_signature_for_another_address_is_401_and_leaves_no_trace(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer, url: str
) -> None:
    worker = await start_worker()
    auth = keypair.auth_data(url, request_idx=5)  # validly signed, for that url
    for path in ("/echo", "/session/create"):
        async with worker.post(path, {"auth_data": auth, "payload": {}}) as response:
            assert response.status == 401
            assert await response.json() == {"error": "auth_data was signed for another worker"}
    ledger = worker.worker.ledger
    assert ledger.interval().received == 0 and ledger.finished_waiting == 0
    assert model_server.recorder.payloads == []
    async with worker.post("/echo", {"auth_data": keypair.auth_data(), "payload": {}}) as answer:
        assert answer.status == 200  # and the worker serves a valid request after


@pytest.mark.parametrize(
    "url",
    [OWN, OWN + "/", OWN + "/echo", OWN + "/some/path?x=1", "HTTP://127.0.0.1:1"],
)
async def test_a_signature_for_this_address_with_or_without_a_path_is_served(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer, url: str
) -> None:
    worker = await start_worker()
    body = {"auth_data": keypair.auth_data(url, request_idx=6), "payload": {"n": 1}}
    async with worker.post("/echo", body) as response:
        assert response.status == 200
        assert await response.json() == {"received": {"n": 1}}
    assert model_server.recorder.payloads == [{"n": 1}]


def test_addresses_compare_by_scheme_host_and_port() -> None:
    assert same_worker("http://h:80/x", "http://h")
    assert same_worker("https://H:443", "https://h:443/")
    assert same_worker("http://[::1]:5/p", "http://[::1]:5")
    assert not same_worker("http://[::1]:5", "http://[::1]:6")
    assert not same_worker("ftp://h:1", "ftp://h:1")  # only http(s) names a worker
    assert not same_worker("http://h:x", "http://h:x")
    assert not same_worker("http://", "http://")


def test_a_url_over_max_url_names_no_worker_and_is_never_cached() -> None:
    """The url is read before its signature is checked: no cache may keep a client's long one."""
    long_url = OWN + "/" + "a" * MAX_URL
    before = _cached_address.cache_info()
    assert worker_address(long_url) is None
    assert not same_worker(long_url, OWN) and not same_worker(OWN.upper() + " " * MAX_URL, OWN)
    assert _cached_address.cache_info() == before  # not even looked up
    assert worker_address(OWN + "/" + "a" * (MAX_URL - len(OWN) - 1)) is not None


def test_only_verified_pairs_of_a_bounded_size_are_kept(keypair: KeyPair) -> None:
    verifier = SignatureVerifier()  # no audience: any url, of any length, is checked
    verifier.load_pem(keypair.pem)
    forged = AuthData.model_validate({**keypair.auth_data(OWN), "signature": "A" * 100_000})
    assert verifier.check(forged) is Verdict.INVALID
    long_url = OWN + "/" + "a" * MAX_CACHED_PAIR
    signed_long = AuthData.model_validate(keypair.auth_data(long_url))
    assert verifier.check(signed_long) is Verdict.ACCEPTED  # served, but too large to keep
    assert verifier.check(signed_long) is Verdict.ACCEPTED
    assert len(verifier) == 0
    assert verifier.check(AuthData.model_validate(keypair.auth_data(OWN))) is Verdict.ACCEPTED
    assert len(verifier) == 1


def test_without_an_audience_any_address_is_accepted(keypair: KeyPair) -> None:
    auth = AuthData.model_validate(keypair.auth_data("http://elsewhere:9"))
    bound = SignatureVerifier(audience=lambda: OWN)
    free = SignatureVerifier()
    for verifier in (bound, free):
        verifier.load_pem(keypair.pem)
    assert bound.check(auth) is Verdict.WRONG_WORKER
    assert free.check(auth) is Verdict.ACCEPTED


def _worker(**environ: str) -> Worker:
    config = WorkerConfig.model_validate({"routes": [{"path": "/echo"}]})
    base = {"REPORT_ADDR": "http://127.0.0.1:9", "UNSECURED": "false"}
    return compose_worker(config, Environment.from_env(base | environ))


def test_the_opt_out_accepts_any_address_and_says_so(
    keypair: KeyPair, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    worker = _worker(PYWORKER_VERIFY_URL="false")
    assert not worker.environment.verify_url
    worker.verifier.load_pem(keypair.pem)
    auth: dict[str, Any] = keypair.auth_data("http://proxy.example:443")
    assert worker.verifier.check(AuthData.model_validate(auth)) is Verdict.ACCEPTED
    announce_address(worker.environment, worker.url)
    assert "PYWORKER_VERIFY_URL=false" in caplog.text and "any worker's address" in caplog.text


def test_the_start_up_log_says_which_address_signatures_must_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    worker = _worker(PUBLIC_IPADDR="203.0.113.7", VAST_TCP_PORT_3000="41234")
    assert worker.environment.verify_url  # on by default
    announce_address(worker.environment, worker.url)
    assert "auth_data must be signed for http://203.0.113.7:41234" in caplog.text


def test_the_flag_is_a_boolean() -> None:
    assert Environment.from_env({"PYWORKER_VERIFY_URL": "true"}).verify_url
    with pytest.raises(ValueError, match="PYWORKER_VERIFY_URL"):
        Environment.from_env({"PYWORKER_VERIFY_URL": "maybe"})
