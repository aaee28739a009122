"""Vector search and feature storage. Speaks numpy arrays and integer ids only."""
