"""pyworker's last words for the start script: bounded, and never a new failure of their own."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyworker.startup.failure import ERROR_FILE_VARIABLE, MAX_ERROR_TEXT, fail, record


def test_fail_prints_and_records_for_the_start_script(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "error"
    fail(
        "invalid worker config x.toml:\n  routes.0.path: missing", {ERROR_FILE_VARIABLE: str(path)}
    )
    assert (
        capsys.readouterr().err
        == "pyworker: invalid worker config x.toml:\n  routes.0.path: missing\n"
    )
    assert path.read_text() == "invalid worker config x.toml:\n  routes.0.path: missing\n"


def test_the_record_is_bounded_and_replaces_an_older_one(tmp_path: Path) -> None:
    path = tmp_path / "error"
    environ = {ERROR_FILE_VARIABLE: str(path)}
    record("x" * 10 * MAX_ERROR_TEXT, environ)
    assert len(path.read_text().rstrip("\n")) == MAX_ERROR_TEXT
    record("short", environ)
    assert path.read_text() == "short\n"


def test_no_file_or_an_unwritable_one_is_no_error(tmp_path: Path) -> None:
    record("nowhere", {})
    record("nowhere", {ERROR_FILE_VARIABLE: str(tmp_path / "missing" / "folder" / "error")})
    assert list(tmp_path.iterdir()) == []
