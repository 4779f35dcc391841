"""Streaming checkpoint converters between formats and frameworks."""
