"""Signed webhooks: Standard Webhooks signing, SSRF-guarded delivery, retries, dispatch."""
