"""Tests of pyworker.devtools: developer tools."""
