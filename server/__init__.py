"""The FastAPI service: HTTP, authentication, the database, storage and the command line."""
