"""Local mode: a stand-in for Vast.ai's autoscaler, so a worker can run and be tested offline."""
