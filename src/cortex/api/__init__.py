"""The HTTP server: the public API for users and the worker API for workers."""
