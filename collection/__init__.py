"""Collections of artworks on disk: the synthetic generator, importers, noun phrases, vocabularies."""
