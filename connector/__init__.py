"""x402-connector domain: importable without FastAPI or Celery.

The API (``api/``) and the workers (``workers/``) both call the services defined here, so
business rules live in exactly one place.
"""

__version__ = "0.1.0"
