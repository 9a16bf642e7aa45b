"""The `pyworker` subcommands beyond `run`: `dev` (everything locally), `call` and `load`."""
