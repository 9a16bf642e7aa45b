"""The wire formats and their verification, no network I/O: the client's envelope, signatures
and keys, canonical JSON, workload, the autoscaler's messages."""
