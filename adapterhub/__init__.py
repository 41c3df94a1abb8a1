"""adapterhub package."""
