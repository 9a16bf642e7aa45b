from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pyworker.protocol.auth import (
    AuthData,
    SignatureVerifier,
    Verdict,
    reference_message,
)
from tests.conftest import KeyPair


def test_reference_message_bytes() -> None:
    assert reference_message("http://1.2.3.4:5") == b'{\n    "url": "http://1.2.3.4:5"\n}'
    assert reference_message("http://é") == b'{\n    "url": "http://\\u00e9"\n}'


def _auth(keypair: KeyPair, **fields: Any) -> AuthData:
    return AuthData.model_validate(keypair.auth_data(**fields))


def test_verify_good_bad_and_cached(keypair: KeyPair, monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = SignatureVerifier(cache_size=2)
    good = _auth(keypair)
    assert verifier.check(good) is Verdict.INVALID  # no key yet
    verifier.load_pem(keypair.pem)
    assert verifier.check(good) is Verdict.ACCEPTED
    assert verifier.check(_auth(keypair, signature=KeyPair().sign(good.url))) is Verdict.INVALID
    assert verifier.check(_auth(keypair, signature="%%%")) is Verdict.INVALID
    # The second check of the same pair costs no RSA operation.
    calls = 0
    real_verify = type(verifier._key).verify  # type: ignore[union-attr]

    def counting(*args: Any) -> None:
        nonlocal calls
        calls += 1
        real_verify(*args)

    monkeypatch.setattr(type(verifier._key), "verify", counting)
    assert verifier.check(good) is Verdict.ACCEPTED
    assert calls == 0
    # The cache is bounded: two other urls push the first out.
    for port in (2, 3):
        url = f"http://127.0.0.1:{port}"
        assert (
            verifier.check(_auth(keypair, url=url, signature=keypair.sign(url))) is Verdict.ACCEPTED
        )
    assert calls == 2 and len(verifier._cache) == 2
    assert verifier.check(good) is Verdict.ACCEPTED
    assert calls == 3


def test_non_rsa_and_garbage_keys_are_refused() -> None:
    verifier = SignatureVerifier()
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match="not an RSA key"):
        verifier.load_pem(ec_pem)
    with pytest.raises(ValueError):
        verifier.load_pem(b"not a key")
    assert not verifier.has_key
