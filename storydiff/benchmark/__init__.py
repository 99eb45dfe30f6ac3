"""Reusable benchmark harness (providers, timing, results); the suites' entry point is ``storydiff bench``."""
