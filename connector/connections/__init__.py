"""Connections: a customer's x402 credentials, stored through the vault."""
