"""The server TLS context for USE_SSL=true, with errors that name the file at fault.

`ssl.SSLContext.load_cert_chain` says "[SSL] PEM lib" whichever of its two files is wrong;
reading and parsing each file first lets start-up say which one, and why.
"""

from __future__ import annotations

import ssl
from pathlib import Path


class TLSError(Exception):
    """The certificate or key cannot be used; the message names the file."""


def server_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A TLS 1.2+ server context from PEM files. Blocking: call it before the loop starts."""
    certificate = _read(cert_file, "certificate")
    key = _read(key_file, "key")
    try:
        from cryptography import x509  # only TLS workers pay for importing it

        x509.load_pem_x509_certificates(certificate)
    except ValueError:
        raise TLSError(f"TLS certificate file {cert_file} holds no PEM certificate") from None
    try:
        from cryptography.hazmat.primitives import serialization

        serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        raise TLSError(f"TLS key file {key_file} holds no unencrypted PEM private key") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as error:
        raise TLSError(
            f"TLS key file {key_file} does not match certificate file {cert_file}: {error}"
        ) from None
    return context


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise TLSError(f"TLS {what} file {path} not found") from None
    except OSError as error:
        raise TLSError(f"TLS {what} file {path} cannot be read: {error.strerror}") from None
