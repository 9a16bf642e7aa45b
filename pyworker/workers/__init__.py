"""The ready workers: one folder each, with its config (worker.py), scripts and datasets.

`pyworker run <name>` finds them here in an installed pyworker. Vast's start script runs
`python3 -m workers.<name>.worker` in a clone instead: the repository's root `workers/` holds one
thin entry point per backend name that imports its worker from here and serves it.
"""
