"""The HTTP API: FastAPI app factory, auth (API keys → tenants), schemas, errors, waits."""
