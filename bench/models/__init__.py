"""Backbones. Each takes a ``Method`` and asks it for every attention core it needs."""
