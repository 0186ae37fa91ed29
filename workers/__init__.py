"""Celery app, thin task wrappers and the beat schedule. No business rules here."""
