"""The autoscaler's keys: loading its public key, signing and verifying with a key pair.

Both signature schemes use these: the reference one (RSA over `{"url": ...}`,
pyworker.protocol.auth) and the strict one (RSA or Ed25519 over a canonical message,
pyworker.protocol.strict). RSA signs with PKCS#1 v1.5 over SHA-256; a signature travels as
base64 text.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

PublicKey = rsa.RSAPublicKey | ed25519.Ed25519PublicKey
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def load_public_key(pem: bytes, *, ed25519_too: bool = True) -> PublicKey:
    """An RSA (or, with `ed25519_too`, Ed25519) public key from PEM; ValueError for anything
    else, saying what it is not (the message reaches the report's `error_msg`)."""
    try:
        key = serialization.load_pem_public_key(pem)
    except UnsupportedAlgorithm as error:
        raise ValueError(f"unsupported public key: {error}") from None
    if isinstance(key, rsa.RSAPublicKey):
        return key
    if not ed25519_too:
        raise ValueError("the autoscaler's public key is not an RSA key")
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError("the autoscaler's public key is neither RSA nor Ed25519")
    return key


def sign_message(key: PrivateKey, message: bytes) -> str:
    """base64 of the signature: RSA PKCS#1 v1.5 over SHA-256, or Ed25519."""
    if isinstance(key, rsa.RSAPrivateKey):
        raw = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    else:
        raw = key.sign(message)
    return base64.b64encode(raw).decode()


def verify_message(key: PublicKey, message: bytes, signature: str) -> bool:
    """Whether `signature` (base64) is `key`'s over `message`; False for text that is not
    base64 at all."""
    try:
        raw = base64.b64decode(signature, validate=True)
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(raw, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            key.verify(raw, message)
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True
