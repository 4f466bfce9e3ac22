"""The ``halting`` looping strategy: learned per-token halting (ACT family)."""
