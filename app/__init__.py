"""artalign's service layer: the HTTP API, the database, ingestion and the command line."""
