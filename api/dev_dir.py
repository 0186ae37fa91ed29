"""What identifies an `x402c dev` data directory and the settings its stack changes.

Kept apart from :mod:`api.stack` (which imports the whole server) so every CLI command can ask
"is this a dev-stack directory?" cheaply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

BOOTSTRAP_KEY_FILE = "dev-admin.key"
CHAIN_STATE_FILE = "anvil-state.json"
DEPLOYMENT_FILE = "devchain.json"
# What the embedded stack changes from the defaults: its chain, facilitator and test receivers
# all live on loopback. CLI commands run on an `x402c dev` data directory apply the same, so
# `x402c connections test` there checks what the dev server would call.
DEV_STACK_OVERRIDES: dict[str, Any] = {"outbound_allow_loopback": True}


def is_dev_stack_dir(data_dir: Path) -> bool:
    """True for a data directory that `x402c dev` runs (or ran) on."""
    return (data_dir / BOOTSTRAP_KEY_FILE).exists() and (data_dir / DEPLOYMENT_FILE).exists()
