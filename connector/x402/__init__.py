"""The x402 protocol adapter: v1 and v2 wire formats and the ``exact`` scheme on EVM.

Everything version-specific stays in this package; the rest of the connector works with the
version-neutral :class:`~connector.x402.requirement.Requirement`.
"""
