import pytest

from healthd_client import MonitorConfig


def test_defaults():
    config = MonitorConfig()
    assert config.heavy_every_steps == 10
    assert config.max_layers == 64
    assert config.update_sample_per_tensor == 1024
    assert config.queue_capacity == 10_000
    assert config.max_batch_reports == 256
    assert config.flush_interval_seconds == 0.5
    assert config.heartbeat_seconds == 5.0
    assert config.request_timeout_seconds == 2.0
    assert config.close_timeout_seconds == 5.0


@pytest.mark.parametrize("kwargs, field", [
    ({"heavy_every_steps": 0}, "heavy_every_steps"),
    ({"max_layers": 2.5}, "max_layers"),
    ({"queue_capacity": True}, "queue_capacity"),
    ({"flush_interval_seconds": 0}, "flush_interval_seconds"),
    ({"heartbeat_seconds": float("nan")}, "heartbeat_seconds"),
    ({"request_timeout_seconds": -1}, "request_timeout_seconds"),
    ({"close_timeout_seconds": float("inf")}, "close_timeout_seconds"),
    ({"retry_backoff_min_seconds": 2.0, "retry_backoff_max_seconds": 1.0}, "retry_backoff_max_seconds"),
])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MonitorConfig(**kwargs)


def test_zero_close_timeout_is_allowed():
    assert MonitorConfig(close_timeout_seconds=0).close_timeout_seconds == 0


def test_no_first_inspections_is_allowed():
    # for a torch.compile'd training step: nothing armed at attach, no extra graph (test_forward_tap)
    assert MonitorConfig(inspect_first_steps=0).inspect_first_steps == 0
    with pytest.raises(ValueError, match="inspect_first_steps must be >= 0"):
        MonitorConfig(inspect_first_steps=-1)
    with pytest.raises(ValueError, match="inspect_every_steps must be >= 1"):
        MonitorConfig(inspect_every_steps=0)


def test_frozen():
    with pytest.raises(AttributeError):
        MonitorConfig().max_layers = 3  # type: ignore[misc]
