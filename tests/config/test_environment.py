from __future__ import annotations

import pytest

from pyworker.config.environment import Environment, InvalidEnvironment


def test_no_platform_variables_means_local_unsecured_loopback() -> None:
    env = Environment.from_env({})
    assert env.local and env.unsecured and env.report_addr == ()
    assert env.host == "127.0.0.1" and env.worker_port == 3000 and env.worker_http_port == 3001
    assert env.public_url() == "http://127.0.0.1:3000"


def test_platform_variables() -> None:
    env = Environment.from_env(
        {
            "CONTAINER_ID": "42",
            "WORKER_PORT": "3000",
            "PUBLIC_IPADDR": "1.2.3.4",
            "VAST_TCP_PORT_3000": "41000",
            "USE_SSL": "true",
            "MASTER_TOKEN": "secret-token",
            "REPORT_ADDR": "https://a.example/, https://b.example",
        }
    )
    assert not env.local and not env.unsecured and env.host == "0.0.0.0"
    assert env.container_id == 42
    assert env.report_addr == ("https://a.example", "https://b.example")
    assert env.public_url() == "https://1.2.3.4:41000"
    assert env.master_token is not None
    assert env.master_token.get_secret_value() == "secret-token"
    assert "secret-token" not in repr(env)


def test_on_the_platform_reports_go_to_vast_by_default() -> None:
    env = Environment.from_env({"CONTAINER_ID": "7"})
    assert env.report_addr == ("https://run.vast.ai",) and not env.unsecured


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"WORKER_PORT": "http"}, "WORKER_PORT"),
        ({"WORKER_PORT": "70000"}, "WORKER_PORT"),
        ({"USE_SSL": "maybe"}, "USE_SSL"),
        ({"CONTAINER_ID": "x"}, "CONTAINER_ID"),
        ({"REPORT_ADDR": "run.vast.ai"}, "REPORT_ADDR"),
        ({"UNSECURED": "false"}, "UNSECURED=false needs REPORT_ADDR"),
    ],
)
def test_bad_values_are_named(environ: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidEnvironment, match=message):
        Environment.from_env(environ)
