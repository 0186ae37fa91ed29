"""Spending policy: static rules, durable budget reservations, approvals, dry-run."""
