"""Placeholder package: this technique has not been implemented yet."""
