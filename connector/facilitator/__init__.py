"""Facilitators: the HTTP client for remote ones and the local one for the dev chain."""
