"""hello_world: a worker in front of pyworker's demo model server."""
