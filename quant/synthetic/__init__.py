"""Synthetic test data built from the project's forward models (no I/O)."""
