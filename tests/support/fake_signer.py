"""Vast's certificate signing endpoint on loopback: a small CA that signs the CSRs posted to it.

`POST /api/v0/sign_cert/?instance_id=N` with a PEM CSR answers the PEM certificate, as Vast
does, or, while `answers` holds scripted failures, the next of them: an HTTP status or a
garbage body. Every request is recorded.

    async with FakeSigner() as signer:
        environ["PYWORKER_SIGN_CERT_URL"] = signer.url
        signer.answers = [Failure(status=503), Failure(body=b"<html>")]
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PATH = "/api/v0/sign_cert/"


@dataclass(frozen=True)
class Failure:
    status: int = 200
    body: bytes = b""


@dataclass(frozen=True)
class SignRequest:
    instance_id: str | None
    content_type: str
    csr: x509.CertificateSigningRequest


@dataclass
class FakeSigner:
    validity: datetime.timedelta = datetime.timedelta(days=30)
    answers: list[Failure] = field(default_factory=list)
    requests: list[SignRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake vast signer")])
        app = web.Application()
        app.router.add_post(PATH, self._sign)
        self._server = TestServer(app, host="127.0.0.1", port=0)

    @property
    def url(self) -> str:
        return str(self._server.make_url(PATH))

    async def __aenter__(self) -> FakeSigner:
        await self._server.start_server()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._server.close()

    def sign(self, csr: x509.CertificateSigningRequest) -> bytes:
        """A PEM certificate for the CSR's key and subject, valid for `validity` from now."""
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self.ca_name)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + self.validity)
        )
        for extension in csr.extensions:
            builder = builder.add_extension(extension.value, extension.critical)
        certificate = builder.sign(self.ca_key, hashes.SHA256())
        return certificate.public_bytes(serialization.Encoding.PEM)

    async def _sign(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            csr = x509.load_pem_x509_csr(body)
        except ValueError:
            return web.Response(status=400, text="not a CSR")
        self.requests.append(
            SignRequest(request.query.get("instance_id"), request.content_type, csr)
        )
        if self.answers:
            failure = self.answers.pop(0)
            return web.Response(status=failure.status, body=failure.body)
        return web.Response(body=self.sign(csr), content_type="application/x-pem-file")


def write_certificate(folder: Path, days: int = 30) -> tuple[Path, Path]:
    """A self-signed certificate valid for `days` and its key: a pair already on an instance."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pyworker.vast.ai")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = folder / "instance.crt", folder / "instance.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_file.write_bytes(key_pem)
    return cert_file, key_file
