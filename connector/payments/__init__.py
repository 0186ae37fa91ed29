"""Payments: the state machine, the Payment entity's transitions, and the action services."""
