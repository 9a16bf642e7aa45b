"""The local autoscaler's RSA key: it signs `/route/` answers exactly as Vast.ai's does."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from pyworker.auth import reference_message

KEY_SIZE = 2048


class SigningKey:
    """An RSA key pair; `generate()` takes a noticeable fraction of a second of CPU."""

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        self.private_key = private_key
        self.public_pem = private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=KEY_SIZE))

    def sign(self, url: str) -> str:
        """base64 of RSA-PKCS1v15-SHA256 over the reference message for `url`."""
        signature = self.private_key.sign(
            reference_message(url), padding.PKCS1v15(), hashes.SHA256()
        )
        return base64.b64encode(signature).decode()
