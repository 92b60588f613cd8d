"""Backends, one small interface and one registry per family (see ``asectl.registry``)."""
