"""Model definitions and loaders (torch)."""
