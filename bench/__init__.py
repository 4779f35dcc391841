"""Parity and speed harnesses over one shared set of cases (cases.py)."""
