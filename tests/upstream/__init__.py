"""Tests of pyworker.upstream: the model-server side."""
