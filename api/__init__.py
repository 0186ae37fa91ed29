"""HTTP edge (FastAPI) and the CLI. Parses, authenticates, calls connector services."""
