"""Backends: one package per backend, one module per op family inside it (see registry.py)."""
