"""USE_SSL=true: the worker serves https with the given certificate, or refuses to start."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import re
import ssl
import sys
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pyworker.config.environment import Environment
from pyworker.serving.tls import TLSError, server_ssl_context
from tests.conftest import KeyPair, ModelServer


def make_certificate(folder: Path, name: str = "instance") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / f"{name}.crt", folder / f"{name}.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


# --- the context ----------------------------------------------------------------------------
def test_a_good_pair_loads(tmp_path: Path) -> None:
    cert_file, key_file = make_certificate(tmp_path)
    context = server_ssl_context(str(cert_file), str(key_file))
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_errors_name_the_file_at_fault(tmp_path: Path) -> None:
    cert_file, key_file = make_certificate(tmp_path)
    other_cert, _ = make_certificate(tmp_path, "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a pem file\n")
    cases = [
        (
            (tmp_path / "absent.crt", key_file),
            f"certificate file {tmp_path / 'absent.crt'} not found",
        ),
        ((cert_file, tmp_path / "absent.key"), f"key file {tmp_path / 'absent.key'} not found"),
        ((garbage, key_file), f"certificate file {garbage} holds no PEM certificate"),
        ((cert_file, garbage), f"key file {garbage} holds no unencrypted PEM private key"),
        ((key_file, key_file), f"certificate file {key_file} holds no PEM certificate"),
        (
            (other_cert, key_file),
            f"key file {key_file} does not match certificate file {other_cert}",
        ),
        ((tmp_path, key_file), f"certificate file {tmp_path} cannot be read"),
    ]
    for (cert, key), message in cases:
        with pytest.raises(TLSError, match=re.escape(message)):
            server_ssl_context(str(cert), str(key))


# --- the process ----------------------------------------------------------------------------
def _environ(**extra: str) -> dict[str, str]:
    drop = ("CONTAINER_ID", "REPORT_ADDR", "UNSECURED", "USE_SSL", "TLS_CERT_FILE", "TLS_KEY_FILE")
    environ = {k: v for k, v in os.environ.items() if k not in drop}
    return environ | extra


def _config(tmp_path: Path, model_server: ModelServer) -> Path:
    config = tmp_path / "worker.toml"
    config.write_text(
        f'[model_server]\nbase_url = "{model_server.url}"\nhealth_path = "/health"\n'
        '[[routes]]\npath = "/echo"\n'
    )
    return config


async def test_the_worker_serves_https_to_a_client_trusting_the_certificate(
    tmp_path: Path, model_server: ModelServer, keypair: KeyPair
) -> None:
    cert_file, key_file = make_certificate(tmp_path)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pyworker", "run", str(_config(tmp_path, model_server)),
        "--port", "0",
        stdout=asyncio.subprocess.PIPE,
        env=_environ(USE_SSL="true", TLS_CERT_FILE=str(cert_file), TLS_KEY_FILE=str(key_file)),
    )  # fmt: skip
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        match = re.search(rb"listening on (https://127\.0\.0\.1:\d+)", line)
        assert match, line
        url = match.group(1).decode()
        trusting = ssl.create_default_context(cafile=str(cert_file))
        connector = aiohttp.TCPConnector(ssl=trusting)
        async with aiohttp.ClientSession(connector=connector) as client:
            for _ in range(500):
                async with client.get(url + "/health") as response:
                    assert response.status == 200
                    if (await response.json())["state"] == "ready":
                        break
                await asyncio.sleep(0.02)
            body = {"auth_data": keypair.auth_data(), "payload": {"over": "tls"}}
            async with client.post(url + "/echo", json=body) as response:
                assert response.status == 200
                assert await response.json() == {"received": {"over": "tls"}}
        async with aiohttp.ClientSession() as client:  # default trust store: refused
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await client.get(url + "/health")
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 15) == 0


@pytest.mark.parametrize("missing", ["TLS_CERT_FILE", "TLS_KEY_FILE"])
async def test_a_missing_file_stops_start_up_with_exit_2_naming_it(
    tmp_path: Path, model_server: ModelServer, missing: str
) -> None:
    cert_file, key_file = make_certificate(tmp_path)
    files = {"TLS_CERT_FILE": str(cert_file), "TLS_KEY_FILE": str(key_file)}
    files[missing] = str(tmp_path / "nowhere.pem")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pyworker", "run", str(_config(tmp_path, model_server)),
        "--port", "0",
        stderr=asyncio.subprocess.PIPE,
        env=_environ(USE_SSL="true", **files),
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert str(tmp_path / "nowhere.pem").encode() in stderr
    assert b"Traceback" not in stderr


def test_the_default_paths_are_the_platform_s() -> None:
    environment = Environment.from_env({"USE_SSL": "true"})
    assert (environment.tls_cert_file, environment.tls_key_file) == (
        "/etc/instance.crt",
        "/etc/instance.key",
    )
    assert environment.public_url().startswith("https://")
