"""Filled by later work: see docs/architecture.md."""
