"""`python -m pyworker.startup.certificate`: the TLS key and certificate a worker serves on Vast.ai.

With `USE_SSL=true` the worker serves HTTPS with `/etc/instance.crt` and `/etc/instance.key`,
a certificate Vast signs for the instance. Vast's own start script makes them with the
`openssl` binary and `curl`; `scripts/on_start.sh` runs this module instead, so a template
image needs neither. It keeps a certificate that is there, matches its key and has more than
a day left; otherwise it makes a 2048-bit RSA key and a CSR (the subject and extensions Vast's
script asks for), posts the CSR to Vast's signing endpoint and writes the key and the answer.
A failed signing (endpoint down, an error status, a redirect, which is never followed, an
answer that is not a certificate for the key or is over 64 KiB, no whole answer in 30 s) is
retried with doubling delays up to a bounded number of attempts, each failure posted to the
autoscaler as `error_msg`; after the last one it exits 1 and writes nothing.

Environment: `CONTAINER_ID` (the instance the certificate is for), `TLS_CERT_FILE` and
`TLS_KEY_FILE` (default `/etc/instance.crt`, `/etc/instance.key`), `PYWORKER_SIGN_CERT_URL`
(default Vast's; `instance_id` is added to its query), `PYWORKER_SIGN_ATTEMPTS` (default 6),
`PYWORKER_SIGN_BACKOFF` (seconds before the first retry, doubling up to 60; default 2).
Exit status: 0 certificate ready, 1 signing failed, 2 bad settings.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import logging
import os
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID

from pyworker.config.environment import InvalidEnvironment, Number, read_number
from pyworker.protocol.messages import post, report_start_error, status_problem

logger = logging.getLogger("pyworker.startup.certificate")

DEFAULT_SIGN_URL = "https://console.vast.ai/api/v0/sign_cert/"
RENEW_BEFORE = datetime.timedelta(days=1)
"""A certificate with less than this left is replaced rather than reused."""
MAX_DELAY = 60.0
REQUEST_TIMEOUT = 30.0
MAX_ANSWER = 64 * 1024
"""Bytes of the signer's answer read: a chain of a dozen certificates; the rest is never read."""
KEY_SIZE = 2048


class SettingsError(ValueError):
    """An environment variable this module needs is missing or unusable."""


class SigningError(Exception):
    """The signing endpoint gave no certificate for the key; the message says why."""


@dataclass(frozen=True)
class Settings:
    cert_file: Path
    key_file: Path
    sign_url: str
    attempts: int
    first_delay: float

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        container_id = environ.get("CONTAINER_ID", "").strip()
        if not container_id:
            raise SettingsError("CONTAINER_ID is not set: Vast signs a certificate per instance")
        base = environ.get("PYWORKER_SIGN_CERT_URL") or DEFAULT_SIGN_URL
        if not base.startswith(("http://", "https://")):
            raise SettingsError(f"PYWORKER_SIGN_CERT_URL={base!r} is not an http(s) URL")
        separator = "&" if urllib.parse.urlsplit(base).query else "?"
        query = urllib.parse.urlencode({"instance_id": container_id})
        attempts = _number(environ, "PYWORKER_SIGN_ATTEMPTS", 6, int)
        first_delay = _number(environ, "PYWORKER_SIGN_BACKOFF", 2.0, float)
        if attempts < 1 or not 0 <= first_delay <= MAX_DELAY:
            raise SettingsError(
                "PYWORKER_SIGN_ATTEMPTS must be at least 1 and "
                f"PYWORKER_SIGN_BACKOFF between 0 and {MAX_DELAY:g} seconds"
            )
        return cls(
            cert_file=Path(environ.get("TLS_CERT_FILE") or "/etc/instance.crt"),
            key_file=Path(environ.get("TLS_KEY_FILE") or "/etc/instance.key"),
            sign_url=f"{base}{separator}{query}",
            attempts=attempts,
            first_delay=first_delay,
        )


def _number(environ: Mapping[str, str], name: str, default: Number, kind: type[Number]) -> Number:
    value = read_number(environ, name, kind, "a number")
    return default if value is None else value


def reuse_problem(cert_file: Path, key_file: Path, now: datetime.datetime) -> str | None:
    """Why the certificate on disk cannot be reused, or None when it can."""
    try:
        certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except FileNotFoundError:
        return f"no certificate at {cert_file}"
    except (OSError, ValueError):
        return f"{cert_file} holds no readable PEM certificate"
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except FileNotFoundError:
        return f"no key at {key_file}"
    except (OSError, ValueError, TypeError):
        return f"{key_file} holds no readable unencrypted PEM key"
    if _public_bytes(certificate.public_key()) != _public_bytes(key.public_key()):
        return f"{cert_file} is not the certificate of {key_file}"
    expires = certificate.not_valid_after_utc
    if expires - now < RENEW_BEFORE:
        return f"{cert_file} expires at {expires:%Y-%m-%d %H:%M} UTC"
    return None


def _public_bytes(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def signing_request(key: rsa.RSAPrivateKey) -> bytes:
    """A PEM CSR with the subject and extensions Vast's start script asks for."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
            x509.NameAttribute(NameOID.COMMON_NAME, "pyworker.vast.ai"),
        ]
    )
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=True, key_encipherment=True,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    any_address = x509.IPAddress(ipaddress.ip_address("0.0.0.0"))
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
        .add_extension(usage, critical=False)
        .add_extension(x509.SubjectAlternativeName([any_address]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM)


def request_signature(
    url: str, csr: bytes, key: rsa.RSAPrivateKey, now: datetime.datetime
) -> bytes:
    """POST the CSR; the PEM answer when it is a current certificate for `key`."""
    headers = {"Content-Type": "application/octet-stream"}
    try:
        status, answer = post(url, csr, headers, timeout=REQUEST_TIMEOUT, limit=MAX_ANSWER)
    except (OSError, ValueError, http.client.HTTPException) as error:
        reason = str(error) or type(error).__name__
        raise SigningError(f"the signing endpoint cannot be reached: {reason}") from None
    if not 200 <= status < 300:  # a 3xx too: a certificate only from the URL configured
        raise SigningError(f"the signing endpoint answered {status_problem(status)}")
    if len(answer) > MAX_ANSWER:
        raise SigningError(f"the signing endpoint's answer is over {MAX_ANSWER} bytes")
    try:
        certificate = x509.load_pem_x509_certificates(answer)[0]
    except ValueError:
        raise SigningError(
            f"the signing endpoint's answer is not a PEM certificate: {_excerpt(answer)}"
        ) from None
    if _public_bytes(certificate.public_key()) != _public_bytes(key.public_key()):
        raise SigningError("the signing endpoint answered a certificate for another key")
    if certificate.not_valid_after_utc <= now:
        raise SigningError("the signing endpoint answered an expired certificate")
    return answer


def _excerpt(answer: bytes) -> str:
    text = answer[:80].decode("utf-8", "replace")
    return repr(text) + ("..." if len(answer) > 80 else "")


def obtain(
    settings: Settings,
    report: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[bytes, bytes]:
    """A new key and its signed certificate, both PEM; SigningError after the last attempt."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_SIZE)
    csr = signing_request(key)
    delay = settings.first_delay
    for attempt in range(1, settings.attempts + 1):
        try:
            now = datetime.datetime.now(datetime.timezone.utc)
            certificate = request_signature(settings.sign_url, csr, key, now)
        except SigningError as error:
            failure = f"TLS certificate not signed (attempt {attempt} of {settings.attempts})"
            if attempt == settings.attempts:
                raise SigningError(f"{failure}: {error}") from None
            message = f"{failure}: {error}; retrying in {delay:g} s"
            logger.warning("%s", message)
            report(message)
            sleep(delay)
            delay = min(delay * 2, MAX_DELAY)
        else:
            pem_key = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            return pem_key, certificate
    raise AssertionError("unreachable: at least one attempt is made")


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` so that a reader sees the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def ensure_certificate(environ: Mapping[str, str]) -> int:
    """Reuse or obtain the certificate; the exit status of the module."""
    cert_file = Path(environ.get("TLS_CERT_FILE") or "/etc/instance.crt")
    key_file = Path(environ.get("TLS_KEY_FILE") or "/etc/instance.key")
    problem = reuse_problem(cert_file, key_file, datetime.datetime.now(datetime.timezone.utc))
    if problem is None:
        logger.info("reusing the TLS certificate %s", cert_file)
        return 0
    try:
        settings = Settings.from_env(environ)
    except (SettingsError, InvalidEnvironment) as error:
        logger.error("%s", error)
        return 2
    logger.info("%s: asking %s for a new one", problem, settings.sign_url)
    try:
        pem_key, certificate = obtain(settings, lambda text: report_start_error(text, environ))
        write_atomically(settings.key_file, pem_key, 0o600)
        write_atomically(settings.cert_file, certificate, 0o644)
    except SigningError as error:
        logger.error("%s", error)
        return 1
    except OSError as error:
        logger.error("cannot write the TLS key or certificate: %s", error)
        return 1
    logger.info("TLS certificate written to %s, key to %s", settings.cert_file, settings.key_file)
    return 0


def main() -> int:
    logging.basicConfig(
        level=os.environ.get("PYWORKER_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return ensure_certificate(os.environ)


if __name__ == "__main__":
    sys.exit(main())
