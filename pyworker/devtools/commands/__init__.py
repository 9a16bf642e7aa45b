"""The `pyworker` subcommands beyond `run`: `dev` (everything locally, a package), `call`,
`load`, `bench`, and the configuration reference."""
