"""The worker's life: its state machine, readiness, benchmark, GPU, accounting and reports."""
