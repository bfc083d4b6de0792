"""Small utilities shared by every layer: typed configs, atomic writes and URI access."""
