"""Helpers that start real services for gpufleet's tests and benchmarks."""

from gpufleet.testing.postgres import PostgresServer, find_pg_bindir

__all__ = ["PostgresServer", "find_pg_bindir"]
