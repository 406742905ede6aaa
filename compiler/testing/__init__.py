"""Helpers for tests: tiny random checkpoints of every family (``compiler.testing.tiny``)."""
