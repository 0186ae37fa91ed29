"""The local dev chain: anvil on loopback and our EIP-3009 test token (DevUSD)."""
