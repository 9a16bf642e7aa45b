"""`python -m pyworker.startup.certificate` as a real process, against a fake Vast signer."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from pyworker.serving.tls import server_ssl_context
from pyworker.startup.certificate import signing_request
from tests.support.fake_autoscaler import FakeAutoscaler
from tests.support.fake_signer import Failure, FakeSigner
from tests.support.recording_host import RecordingHost, endless, redirect_to

CLEARED = ("CONTAINER_ID", "REPORT_ADDR", "USE_SSL", "TLS_CERT_FILE", "TLS_KEY_FILE")


@dataclass
class Run:
    status: int
    output: str


@dataclass
class Instance:
    """The files and environment of one instance, with its signer and autoscaler."""

    folder: Path
    signer: FakeSigner
    autoscaler: FakeAutoscaler

    @property
    def cert_file(self) -> Path:
        return self.folder / "etc" / "instance.crt"

    @property
    def key_file(self) -> Path:
        return self.folder / "etc" / "instance.key"

    def environ(self, **extra: str) -> dict[str, str]:
        environ = {
            name: value
            for name, value in os.environ.items()
            if name not in CLEARED and not name.startswith("PYWORKER_")
        }
        return environ | {
            "CONTAINER_ID": "42",
            "MASTER_TOKEN": "secret-token",
            "REPORT_ADDR": self.autoscaler.url,
            "PUBLIC_IPADDR": "127.0.0.9",
            "WORKER_PORT": "3000",
            "VAST_TCP_PORT_3000": "41234",
            "USE_SSL": "true",
            "TLS_CERT_FILE": str(self.cert_file),
            "TLS_KEY_FILE": str(self.key_file),
            "PYWORKER_SIGN_CERT_URL": self.signer.url,
            "PYWORKER_SIGN_BACKOFF": "0.05",
            **extra,
        }

    async def run(self, **extra: str) -> Run:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pyworker.startup.certificate",
            env=self.environ(**extra),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        return Run(process.returncode, output.decode(errors="replace"))

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_file.read_bytes())


@pytest.fixture
async def instance(tmp_path: Path) -> AsyncIterator[Instance]:
    async with FakeSigner() as signer, FakeAutoscaler() as autoscaler:
        yield Instance(tmp_path, signer, autoscaler)


def public_key_bytes(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def closed_port_url(port: int) -> str:
    """A loopback URL where nothing listens (pass the `refused_port`): the endpoint is down."""
    return f"http://127.0.0.1:{port}/api/v0/sign_cert/"


async def test_new_key_and_csr_are_signed_and_the_worker_can_serve_them(
    instance: Instance,
) -> None:
    run = await instance.run()

    assert run.status == 0, run.output
    [request] = instance.signer.requests
    assert request.instance_id == "42"
    assert request.content_type == "application/octet-stream"
    assert request.csr.is_signature_valid
    subject = {attribute.oid: attribute.value for attribute in request.csr.subject}
    assert subject[NameOID.COMMON_NAME] == "pyworker.vast.ai"
    assert subject[NameOID.COUNTRY_NAME] == "US"
    names = request.csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("0.0.0.0")]
    # the key never leaves the instance: it is only readable by its owner
    assert instance.key_file.stat().st_mode & 0o777 == 0o600
    assert public_key_bytes(instance.certificate()) == request.csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    server_ssl_context(str(instance.cert_file), str(instance.key_file))  # what USE_SSL loads
    assert instance.autoscaler.worker_status == []


async def test_a_present_matching_certificate_is_reused_without_signing(
    instance: Instance, refused_port: int
) -> None:
    assert (await instance.run()).status == 0
    certificate, key = instance.cert_file.read_bytes(), instance.key_file.read_bytes()

    run = await instance.run(PYWORKER_SIGN_CERT_URL=closed_port_url(refused_port))  # a reboot

    assert run.status == 0, run.output
    assert "reusing the TLS certificate" in run.output
    assert len(instance.signer.requests) == 1
    assert (instance.cert_file.read_bytes(), instance.key_file.read_bytes()) == (certificate, key)


@pytest.mark.parametrize("case", ["expiring", "another key", "garbage", "key missing"])
async def test_a_certificate_that_cannot_serve_is_replaced(instance: Instance, case: str) -> None:
    if case == "expiring":
        instance.signer.validity = datetime.timedelta(hours=2)  # under a day left
    assert (await instance.run()).status == 0
    if case == "another key":
        other = instance.folder / "other"
        other.mkdir()
        await Instance(other, instance.signer, instance.autoscaler).run()
        instance.cert_file.write_bytes((other / "etc" / "instance.crt").read_bytes())
    elif case == "garbage":
        instance.cert_file.write_text("<html>503 Service Unavailable</html>\n")
    elif case == "key missing":
        instance.key_file.unlink()
    signed = len(instance.signer.requests)
    instance.signer.validity = datetime.timedelta(days=30)

    run = await instance.run()

    assert run.status == 0, run.output
    assert len(instance.signer.requests) == signed + 1
    assert instance.certificate().not_valid_after_utc > datetime.datetime.now(
        datetime.timezone.utc
    ) + datetime.timedelta(days=29)
    server_ssl_context(str(instance.cert_file), str(instance.key_file))


async def test_failed_signing_is_reported_and_retried_with_growing_delays(
    instance: Instance,
) -> None:
    instance.signer.answers = [
        Failure(status=503, body=b"maintenance"),
        Failure(body=b"<html>not a certificate</html>"),
    ]

    run = await instance.run()

    assert run.status == 0, run.output
    assert len(instance.signer.requests) == 3
    reports = instance.autoscaler.worker_status
    assert [report["error_msg"] for report in reports] == [
        "TLS certificate not signed (attempt 1 of 6): the signing endpoint answered HTTP 503;"
        " retrying in 0.05 s",
        "TLS certificate not signed (attempt 2 of 6): the signing endpoint's answer is not a PEM"
        " certificate: '<html>not a certificate</html>'; retrying in 0.1 s",
    ]
    assert all(report["id"] == 42 and report["mtoken"] == "secret-token" for report in reports)
    assert reports[0]["url"] == "https://127.0.0.9:41234"
    server_ssl_context(str(instance.cert_file), str(instance.key_file))


@pytest.mark.parametrize("failure", ["down", "garbage", "another key"])
async def test_signing_gives_up_after_its_attempts_and_writes_nothing(
    instance: Instance, failure: str, refused_port: int
) -> None:
    extra = {"PYWORKER_SIGN_ATTEMPTS": "3"}
    if failure == "down":
        extra["PYWORKER_SIGN_CERT_URL"] = closed_port_url(refused_port)
        expected = "the signing endpoint cannot be reached"
    elif failure == "garbage":
        instance.signer.answers = [Failure(body=b"\x00\xff garbage")] * 3
        expected = "the signing endpoint's answer is not a PEM certificate"
    else:
        instance.signer.answers = [Failure(body=_certificate_of_another_key(instance))] * 3
        expected = "the signing endpoint answered a certificate for another key"

    run = await instance.run(**extra)

    assert run.status == 1
    assert f"TLS certificate not signed (attempt 3 of 3): {expected}" in run.output
    assert "Traceback" not in run.output
    assert not instance.cert_file.exists()
    assert not instance.key_file.exists()
    reports = instance.autoscaler.worker_status
    assert [report["error_msg"].split(":")[0] for report in reports] == [
        "TLS certificate not signed (attempt 1 of 3)",
        "TLS certificate not signed (attempt 2 of 3)",
    ]
    assert all(expected in report["error_msg"] for report in reports)


@pytest.mark.parametrize("code", [302, 307])
async def test_a_redirecting_signer_is_not_followed(instance: Instance, code: int) -> None:
    """A certificate comes only from the URL configured: a 3xx is a failed attempt."""
    signer = instance.signer
    signer_host = signer.url.split("/api")[0]
    redirecting = await RecordingHost(redirect_to(lambda: signer_host, code)).start()
    try:
        run = await instance.run(
            PYWORKER_SIGN_CERT_URL=redirecting.url + "/api/v0/sign_cert/",
            PYWORKER_SIGN_ATTEMPTS="2",
        )
    finally:
        await redirecting.close()

    assert run.status == 1
    assert len(redirecting.requests) == 2
    assert signer.requests == []  # the CSR never went where the 3xx pointed
    expected = f"the signing endpoint answered HTTP {code} (a redirect, not followed)"
    assert f"TLS certificate not signed (attempt 2 of 2): {expected}" in run.output
    [report] = instance.autoscaler.worker_status
    assert expected in report["error_msg"]
    assert not instance.cert_file.exists() and not instance.key_file.exists()


async def test_an_endless_signer_answer_is_cut_at_the_bound(instance: Instance) -> None:
    sent: list[int] = []
    flood = await RecordingHost(endless(sent)).start()
    try:
        run = await instance.run(PYWORKER_SIGN_CERT_URL=flood.url, PYWORKER_SIGN_ATTEMPTS="1")
        for _ in range(100):  # the flood notes its total once it sees the reader gone
            if sent:
                break
            await asyncio.sleep(0.1)
    finally:
        await flood.close()

    assert run.status == 1
    assert "the signing endpoint's answer is over 65536 bytes" in run.output
    assert sent and sent[0] < 16 * 1024 * 1024  # the reader left at the bound, not at the end
    assert not instance.cert_file.exists()


def _certificate_of_another_key(instance: Instance) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = x509.load_pem_x509_csr(signing_request(key))
    return instance.signer.sign(csr)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"CONTAINER_ID": ""}, "CONTAINER_ID is not set"),
        ({"PYWORKER_SIGN_ATTEMPTS": "0"}, "PYWORKER_SIGN_ATTEMPTS must be at least 1"),
        ({"PYWORKER_SIGN_BACKOFF": "soon"}, "PYWORKER_SIGN_BACKOFF='soon' is not a number"),
        ({"PYWORKER_SIGN_CERT_URL": "ftp://signer"}, "is not an http(s) URL"),
    ],
)
async def test_bad_settings_exit_2_naming_the_variable(
    instance: Instance, extra: dict[str, str], message: str
) -> None:
    run = await instance.run(**extra)

    assert run.status == 2
    assert message in run.output
    assert instance.signer.requests == []
