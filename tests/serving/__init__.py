"""Tests of pyworker.serving: the aiohttp side."""
