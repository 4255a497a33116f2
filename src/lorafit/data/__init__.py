"""Labelled texts: reading, splitting, tokenising and batching."""
