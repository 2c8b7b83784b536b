"""Shared data plumbing: choosing real vs synthetic data, download + checksum + extract."""

from adashift_pl.data.source import SOURCES, resolve_source

__all__ = ["SOURCES", "resolve_source"]
