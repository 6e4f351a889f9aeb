"""Reconstruction jobs that read from and write to the archive."""
