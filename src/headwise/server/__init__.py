"""``headwise serve``: a :class:`~headwise.memory.VectorMemory` as an authenticated HTTP service.

- :mod:`headwise.server.app`: ``create_app(store, api_key=...)``, the FastAPI application.
- :mod:`headwise.server.cli`: the ``headwise serve`` command (uvicorn).
- :mod:`headwise.server.client`: :class:`RemoteMemory`, the ``VectorMemory`` API over HTTP.

This package imports nothing at import time, so ``import headwise`` and ``import
headwise.memory`` never pull in fastapi, uvicorn or httpx (the ``server`` extra).
"""
