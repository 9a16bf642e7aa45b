"""textgen: a worker whose model is loaded in its own process (no model server)."""
