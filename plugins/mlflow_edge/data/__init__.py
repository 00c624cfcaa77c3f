"""Vendored evaluation text (see README.md in this folder for its license)."""
