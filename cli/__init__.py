"""The `nightrender` command line: the embedded stack, and a client of the HTTP API."""
