"""The wire formats: the client's envelope, signatures, workload, the autoscaler's messages."""
