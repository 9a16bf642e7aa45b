"""Tests of the ready workers (pyworker.workers and workers/)."""
