"""DeepSeek-V4 / V3.2 built only from v4hal.ops."""
