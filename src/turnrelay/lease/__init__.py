"""Lease: at most one executor runs a session at a time."""
