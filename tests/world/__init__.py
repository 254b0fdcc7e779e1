"""Tests of the embedded shapes world (galip.world)."""
