"""Tests of pyworker.startup: the entrypoint's helpers."""
