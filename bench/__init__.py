"""Benchmarks that measure the sidecar against direct SMTP submission in the same run (see README.md)."""
