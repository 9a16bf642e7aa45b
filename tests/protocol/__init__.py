"""Tests of pyworker.protocol: the wire formats."""
