"""The attention backends (reference, eager, tiled, sdpa, flex), their registry and auto's tuning.

A regular package (not a namespace package), so that every tool imports its modules under one
name: ``headwise.kernels.registry`` and never a second copy with its own backends and caches.
"""
