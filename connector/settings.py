"""Configuration, read from ``X402C_*`` environment variables (and an optional ``.env``).

Two modes: ``dev`` (the embedded default: SQLite, in-process queue, local chain, generated master
key file) and ``production`` (every secret and endpoint must be given explicitly; missing or
malformed values stop the process at start with a clear message).
See ``docs/configuration.md`` for every field.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="X402C_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # --- general -------------------------------------------------------------------------
    mode: Literal["dev", "production"] = "dev"
    data_dir: Path = Path(".x402c")
    log_format: Literal["console", "json"] = "console"
    log_level: str = "INFO"
    public_base_url: str = "http://127.0.0.1:8402"

    # --- storage -------------------------------------------------------------------------
    database_url: str | None = None  # default: sqlite file in data_dir
    database_password_file: Path | None = None  # password kept out of the URL (Compose secret)

    # --- queue ---------------------------------------------------------------------------
    broker_url: str = "memory://localhost/"  # in-process; production: redis://127.0.0.1:6379/0
    result_backend: str | None = None  # default: same Redis as the broker, or cache+memory://
    task_time_limit_s: int = 120
    task_max_retries: int = 8
    # A killed worker's unacknowledged task is redelivered after this many seconds. It must exceed
    # the task time limit (a running task is redelivered when it passes this); retry countdowns
    # are capped to fit in what is left (workers/tasks.py).
    broker_visibility_timeout_s: int = Field(default=180, ge=1)
    broker_restore_interval_s: int = 10  # how often workers sweep for such abandoned tasks
    #: Connect and read timeout of every broker call: a hung broker (accepts, never answers)
    #: fails a publish after about this long instead of blocking its caller for ever.
    broker_timeout_s: float = Field(default=5.0, gt=0, le=60)
    worker_prefetch: int = 1  # messages a worker thread reserves ahead (late acks keep them safe)
    worker_task_logs: bool = False  # Celery's own "received"/"succeeded" line per task at INFO

    # --- vault ---------------------------------------------------------------------------
    master_keys: SecretStr | None = None  # "kid1:base64key,kid2:base64key"; first is active
    master_key_file: Path | None = None  # default in dev: data_dir/master.keys

    # --- chain / facilitator --------------------------------------------------------------
    anvil_path: Path | None = None  # default: .devtools/bin/anvil, then PATH
    devchain_port: int = 8545
    default_rpc_url: str | None = None
    default_facilitator_url: str | None = None
    receipt_poll_interval_s: float = 0.005
    # How long an action waits for the receipt of a transaction it sent itself (the payer's
    # escrow reclaim) before reporting the outcome unknown (retried; reconcile reads the chain).
    receipt_timeout_s: float = Field(default=30.0, gt=0)
    rpc_timeout_s: float = 10.0
    # Widest block range one ``eth_getLogs`` asks for: public providers refuse more than a few
    # thousand blocks (Base's public RPC, Alchemy, Infura), so escrow history is read in ranges
    # of at most this many blocks, walking forward from each payment's recorded lower bound.
    rpc_max_log_range: int = Field(default=2_000, ge=1, le=1_000_000)
    # Confirmations per network (CAIP-2 id or v1 name -> blocks, JSON in the environment:
    # '{"eip155:8453": 3}') overriding the registry's default (connector/x402/networks.py): an
    # on-chain escrow event counts once the head is that many blocks deep, its own included.
    network_confirmations: dict[str, int] = Field(default_factory=dict)
    facilitator_timeout_s: float = 15.0
    external_max_retries: int = 3

    # --- webhooks ------------------------------------------------------------------------
    webhook_timeout_s: float = 5.0
    webhook_max_response_bytes: int = 64 * 1024
    webhook_allow_loopback: bool = False  # deprecated alias of outbound_allow_loopback
    webhook_disable_after_days: float = 5.0
    webhook_secret_overlap_hours: float = 24.0

    # --- outbound HTTP for `send` ----------------------------------------------------------
    send_timeout_s: float = 15.0
    send_max_response_bytes: int = 1024 * 1024
    send_allow_loopback: bool = False  # deprecated alias of outbound_allow_loopback

    # --- outbound SSRF policy (webhooks, send, RPC, facilitator, connection test) ----------
    outbound_allow_loopback: bool = False  # dev and tests only
    outbound_allow_hosts: str = ""  # "rpc.internal,*.corp.example,10.20.0.0/16": operator infra

    # --- API -----------------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = 8402
    idempotency_ttl_hours: int = Field(default=48, ge=24)
    auth_failure_limit: int = Field(default=20, ge=1)  # failed authentications per window ...
    auth_failure_window_s: float = Field(default=60.0, gt=0)  # ... per client address / key prefix
    api_max_body_bytes: int = Field(default=1024 * 1024, ge=1024)  # larger bodies: 413
    api_max_json_depth: int = Field(default=32, ge=4, le=256)  # deeper JSON: 422, not parsed
    health_probe_timeout_s: float = Field(default=0.5, gt=0)  # per dependency check
    health_cache_s: float = Field(default=2.0, ge=0)  # a probe result is reused this long
    # How stale a paywall's cached open/paid-out state may be when another process changed it
    # (this process's own changes apply at once); 0 = read the database on every hit.
    paywall_state_ttl_s: float = Field(default=1.0, ge=0, le=60)

    @field_validator("network_confirmations")
    @classmethod
    def _confirmations(cls, value: dict[str, int]) -> dict[str, int]:
        from connector.x402.errors import UnknownNetwork
        from connector.x402.networks import to_caip2

        checked: dict[str, int] = {}
        for network, blocks in value.items():
            try:
                key = to_caip2(network)
            except UnknownNetwork as exc:
                raise ValueError(exc.detail) from exc
            if not 1 <= blocks <= 1_000:
                raise ValueError(f"confirmations for {network} must be 1..1000, not {blocks}")
            checked[key] = blocks
        return checked

    @model_validator(mode="after")
    def _production_needs_explicit_config(self) -> Settings:
        if self.mode == "production":
            missing = []
            if not self.database_url:
                missing.append("X402C_DATABASE_URL")
            if self.master_keys is None and self.master_key_file is None:
                missing.append("X402C_MASTER_KEYS or X402C_MASTER_KEY_FILE")
            if missing:
                raise ValueError("production mode requires " + ", ".join(missing))
        return self

    @property
    def outbound_loopback_allowed(self) -> bool:
        """One loopback switch for every outbound client; the two older per-surface names still
        turn it on (they were dev/test switches too)."""
        return any(
            (self.outbound_allow_loopback, self.webhook_allow_loopback, self.send_allow_loopback)
        )

    @property
    def resolved_database_url(self) -> str:
        if self.database_url and self.database_password_file is not None:
            from sqlalchemy.engine import make_url

            password = self.database_password_file.read_text().strip()
            url = make_url(self.database_url).set(password=password)
            return url.render_as_string(hide_password=False)
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'x402c.db').as_posix()}"

    @property
    def resolved_master_key_file(self) -> Path:
        return self.master_key_file or (self.data_dir / "master.keys")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings; tests build their own ``Settings(...)`` instead of patching env."""
    return Settings()
