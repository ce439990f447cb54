"""Baselines enrich-server is benchmarked against: a do-nothing ASGI ceiling and FastAPI + Redis."""
