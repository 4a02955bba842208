"""healthd's configuration: typed, with units in the names, validated at start.

A YAML file (``healthd serve --config healthd.yaml``) maps onto ``Settings``;
its ``rules:`` section maps rule names onto each rule's own ``Config``. A bad
file fails at start with a ``ConfigError`` naming the field at fault.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreSettings(_Section):
    window_steps: int = Field(default=512, ge=16, description="steps kept per rank for the rules (scalar columns)")
    detail_steps: int = Field(
        default=128, ge=16,
        description="latest steps kept whole per rank (per-layer stats, activations, inputs); older steps of the "
                    "window keep their scalars only, so memory does not grow with layers x window_steps",
    )
    initial_steps: int = Field(default=20, ge=1, description="first steps of a rank kept for the whole run")
    evals_kept: int = Field(default=256, ge=1, description="latest monitor.eval() reports kept per rank")
    gpu_samples_kept: int = Field(default=256, ge=1, description="latest GPU samples kept per rank")
    job_ttl_seconds: float = Field(default=3600.0, gt=0, description="forget jobs silent for this long")
    alert_history_per_job: int = Field(default=1000, ge=1, description="resolved alerts kept per job")
    noise_scale_ema_alpha: float = Field(
        default=0.05, gt=0, le=1,
        description="weight of each rank-step in the EMAs of tr(Sigma) and |G|^2 (healthd.state.noise_scale)",
    )


    @model_validator(mode="after")
    def _detail_within_window(self) -> StoreSettings:
        if self.detail_steps > self.window_steps:
            raise ValueError(f"detail_steps ({self.detail_steps}) must not exceed window_steps ({self.window_steps})")
        return self


class ExporterSettings(_Section):
    window_seconds: float = Field(
        default=60.0, gt=0, description="sliding window of the *_window_max/min gauges; > scrape interval"
    )


class EngineSettings(_Section):
    tick_seconds: float = Field(default=1.0, gt=0, description="period of job-scoped (time-based) rules")
    max_steps_per_evaluation: int = Field(
        default=5, ge=1, description="a rank's rules judge checkpoints: its first step, the step that enters each "
        "new block of this many step numbers, every NaN/Inf step and the one before it, and its last step when it "
        "closes; each on the window as of that step, however the steps were split into requests and whenever the "
        "budget lets the rules run (healthd.engine.scheduler), so a rank's alerts depend on its series alone")
    dense_checkpoint_steps: int = Field(
        default=10, ge=0, description="each of a rank's first this many steps is a checkpoint too, whatever "
        "max_steps_per_evaluation: mistakes made at the start (a missing zero_grad, a wrong initial loss, an "
        "optimizer that misses parameters) are judged at the step they show")
    rank_rules_cpu_share: float = Field(
        default=0.25, gt=0, le=1, description="fraction of one core rank-scoped rules may use under load "
        "(healthd.engine.scheduler): a rank whose checkpoints do not fit waits, and they are judged later on their own "
        "windows (the alerts come later, not different); a rank that falls more than half of store.detail_steps "
        "behind sheds its oldest checkpoints (healthd_rank_checkpoints_shed_total), so the share stays a cap; 1 judges "
        "every request's checkpoints before answering it, whatever the cost")
    max_checkpoint_lag_seconds: float = Field(
        default=10.0, gt=0, description="a rank whose oldest waiting checkpoint has waited this long (the server is "
        "behind its rank_rules_cpu_share) sheds all its waiting checkpoints but the newest, counted in "
        "healthd_rank_checkpoints_shed_total: alerts come at most about this late, but may then differ from an "
        "unloaded server's")
    rank_rules_burst_seconds: float = Field(
        default=0.5, gt=0, description="CPU seconds rank-scoped rules may spend at once before the share applies "
        "(a burst after a quiet period is evaluated at once)")


class LimitSettings(_Section):
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    max_reports_per_request: int = Field(default=10_000, ge=1, description="larger report batches get 413")
    # Cardinality caps: each bounds the series /metrics exposes. A report past a cap is
    # rejected (422 naming the cap); the job's other reports are still accepted.
    max_jobs: int = Field(default=1_000, ge=1, description="jobs tracked at once")
    max_ranks_per_job: int = Field(default=16_384, ge=1, description="ranks tracked per job")
    max_layers_per_job: int = Field(default=1_024, ge=1, description="distinct layer names per job")
    max_streams_per_job: int = Field(
        default=8, ge=1, description="named streams per job (attach(stream=...): one monitor per model or "
        "optimizer of a GAN, actor-critic or distillation job); the unnamed stream is not counted")
    stream_owner_live_seconds: float = Field(
        default=60.0, gt=0, description="a second monitor attaching to a (job, rank, stream) is refused while the "
        "first one is open and was heard from this recently (a restarted job's new monitor is accepted once the "
        "old one closed or went silent)")


class AuthSettings(_Section):
    """Optional bearer token. Unset: no authentication (bind to localhost or a private network)."""

    token: SecretStr | None = Field(default=None, description="required as 'Authorization: Bearer <token>'")
    protect_metrics: bool = Field(default=False, description="require the token on GET /metrics too")
    protect_healthz: bool = Field(default=False, description="require the token on GET /healthz too")


class PersistenceSettings(_Section):
    sqlite_path: str | None = Field(
        default=None, description="SQLite file for alert state and history; None keeps them in memory only"
    )


MIN_EXPIRY_RESENDS = 4  # a firing alert's endsAt is at least this many resend periods ahead, as in Prometheus


class AlertmanagerSettings(_Section):
    """Direct push to Alertmanager's v2 API (healthd.alerting.alertmanager). No url and no urls: no push.

    Several URLs are the peers of an Alertmanager cluster (``--cluster.peer``): every alert goes to
    each of them independently, as Prometheus sends to every Alertmanager it lists, so one peer down
    delays nobody; the peers' gossip makes a notification go out once."""

    url: str | None = Field(default=None, description="Alertmanager base URL, e.g. http://alertmanager:9093")
    urls: tuple[str, ...] = Field(
        default=(),
        description="more Alertmanager base URLs (the peers of a cluster); each gets every alert, with url",
    )
    resend_seconds: float = Field(default=60.0, gt=0, description="firing alerts are re-sent this often")
    firing_expiry_seconds: float = Field(
        default=900.0, gt=0, description="endsAt of a firing alert is this far ahead (at least "
        f"{MIN_EXPIRY_RESENDS} x resend_seconds): how long Alertmanager keeps it if its healthd dies. A resolved "
        "alert is sent with endsAt = when it resolved, so this matters only when the sender is gone: it must cover "
        "the time the shard that takes a dead shard's jobs needs to fill a rule's window and fire the alert again "
        "(LossPlateau: 30+ steps), else the alert shows resolved, then fires again; the price: an alert whose fault "
        "ended while no healthd judged it stays active this long")
    silent_job_seconds: float = Field(
        default=60.0, gt=0, description="a job that sent nothing to this healthd (heartbeats included: the client "
        "sends one every few seconds) for this long was handed over to another shard, or is gone: its alerts are "
        "no longer sent, neither re-sent as firing nor resolved, and lapse in Alertmanager at their endsAt unless "
        "the shard that has the job now sends them; except the alerts of rules that fire because a job went silent "
        "(RankStalled, TrainingStalled)")
    timeout_seconds: float = Field(default=5.0, gt=0, description="HTTP timeout of one push")
    max_backoff_seconds: float = Field(default=60.0, gt=0, description="longest wait between retries while down")

    @property
    def expiry_seconds(self) -> float:
        """How far ahead a firing alert's endsAt is: ``firing_expiry_seconds``, at least ``MIN_EXPIRY_RESENDS``
        resend periods (a push or two may fail without the alert lapsing)."""
        return max(self.firing_expiry_seconds, MIN_EXPIRY_RESENDS * self.resend_seconds)

    @property
    def targets(self) -> list[str]:
        """Every Alertmanager to push to: ``url`` then ``urls``, each once."""
        return list(dict.fromkeys(u.rstrip("/") for u in [*([self.url] if self.url else []), *self.urls]))


class ClusterSettings(_Section):
    """healthd run as shards behind a proxy that hashes by job (docs/scaling.md). Unset: one server."""

    route_url: str | None = Field(
        default=None, description="the URL through which clients reach healthd (the proxy, e.g. "
        "http://healthd-proxy:9184): a job silent here for alertmanager.silent_job_seconds is looked up through "
        "it (GET /v1/jobs/{job}); when the shard that answers heard from the job later than this one, the job "
        "moved there (failback), and this shard forgets it without paging (healthd_jobs_handed_over_total); "
        "unset: silent jobs are kept until store.job_ttl_seconds, and their stalls page")
    route_timeout_seconds: float = Field(default=2.0, gt=0, description="HTTP timeout of one look-up through "
                                         "route_url (unanswered: nothing changes, a real stall still pages)")
    route_recheck_seconds: float = Field(default=30.0, gt=0, description="a silent job found not moved (or "
                                         "not answered) is looked up again at most this often")


class Settings(_Section):
    host: str = Field(default="127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(default=9184, ge=0, le=65535, description="port to listen on")
    public_url: str | None = Field(default=None, description="base URL for links in alerts")
    store: StoreSettings = StoreSettings()
    exporter: ExporterSettings = ExporterSettings()
    engine: EngineSettings = EngineSettings()
    limits: LimitSettings = LimitSettings()
    auth: AuthSettings = AuthSettings()
    persistence: PersistenceSettings = PersistenceSettings()
    alertmanager: AlertmanagerSettings = AlertmanagerSettings()
    cluster: ClusterSettings = ClusterSettings()
    rules: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-rule config by alert name")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Settings:
        try:
            return cls.model_validate(dict(data))
        except ValidationError as e:
            raise ConfigError(describe_error(e)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> Settings:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        return cls.from_mapping(data)


def describe_error(e: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)
