"""The local autoscaler's key: it signs `/route/` answers as Vast.ai's does, and strictly too.

The reference signature is RSA PKCS#1 v1.5 / SHA-256 over `{"url": ...}`, so a worker in
reference mode (ours or Vast.ai's) accepts it; the strict signature (pyworker.protocol.strict) binds
the whole request and an expiry. An Ed25519 key signs strictly only: reference workers know
RSA alone, so its reference `signature` is left empty.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from pyworker.protocol.auth import reference_message
from pyworker.protocol.keys import PrivateKey, sign_message

KEY_SIZE = 2048


class SigningKey:
    """A key pair; `generate()` of an RSA key takes a noticeable fraction of a second of CPU."""

    def __init__(self, private_key: PrivateKey) -> None:
        self.private_key = private_key
        self.public_pem = private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=KEY_SIZE))

    @classmethod
    def generate_ed25519(cls) -> SigningKey:
        return cls(ed25519.Ed25519PrivateKey.generate())

    def sign(self, url: str) -> str:
        """base64 of RSA-PKCS1v15-SHA256 over the reference message for `url` ("" for Ed25519)."""
        if not isinstance(self.private_key, rsa.RSAPrivateKey):
            return ""
        return sign_message(self.private_key, reference_message(url))
