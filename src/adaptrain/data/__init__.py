"""Loaders the trainer can rebuild with changes, and the loader state exact resume needs."""
