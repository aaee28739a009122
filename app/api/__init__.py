"""The HTTP API: thin routes (parse, call a service, answer a response model)."""
