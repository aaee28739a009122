"""Services: what the HTTP routes and the command line both call (ingest, retrieval)."""
