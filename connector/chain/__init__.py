"""Talking to an EVM chain: JSON-RPC reads, token calls, transactions, receipts, logs."""

from connector.chain.client import ChainClient, RpcError, TransactionReverted, Transfer

__all__ = ["ChainClient", "RpcError", "TransactionReverted", "Transfer"]
