"""Particle file formats: one module per format family, each with a reader and a writer.

Readers take ``(path, geometry)`` and return the canonical table; writers take
``(table, path, geometry)``. :mod:`cryocaps.io.particles` registers them.
"""
