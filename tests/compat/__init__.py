"""Tests of pyworker.compat: the reference SDK's API."""
