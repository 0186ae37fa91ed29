"""Outbound networking shared by every client that talks to a URL a customer controls."""
