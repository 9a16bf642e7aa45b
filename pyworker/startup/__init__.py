"""What the container's entrypoint runs around a worker: certificate, start report, failure."""
