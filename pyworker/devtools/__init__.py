"""Developer tools that `pyworker run` never imports: commands, the local autoscaler, the demo."""
