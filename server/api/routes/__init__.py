"""REST routes under /api/v1: thin functions that resolve dependencies and call one service."""
