"""Tests of pyworker.lifecycle: the worker's life."""
