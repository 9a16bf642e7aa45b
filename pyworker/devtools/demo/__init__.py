"""A demo model server for local runs: an OpenAI-shaped stand-in, no GPU and no weights."""
