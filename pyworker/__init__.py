"""pyworker: the worker that sits beside a model server on a serverless GPU instance."""

__version__ = "0.1.0"
