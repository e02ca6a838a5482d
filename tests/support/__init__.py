"""Helpers for this project's own tests: a real broker, a test PKI, the daemon as a child process.

They live here, not in the installed package, so that no vehicle carries them.
"""
