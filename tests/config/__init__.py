"""Tests of pyworker.config: configuration and the environment."""
