import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import pytest

from healthd_client import MonitorConfig
from healthd_client.transport import HttpTransport, Sender
from tests.client.conftest import RecordingTransport, validate

QUICK = dict(flush_interval_seconds=0.01, heartbeat_seconds=60.0, close_timeout_seconds=5.0,
             retry_backoff_min_seconds=0.005, retry_backoff_max_seconds=0.02)


def report(i: int) -> dict:
    return {"kind": "eval", "job": "j", "rank": 0, "time": 1.0, "step": i}


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


@pytest.fixture
def senders():
    made = []

    def make(transport, **kwargs):
        heartbeat = kwargs.pop("heartbeat", None)
        token = kwargs.pop("token", None)
        sender = Sender(transport, MonitorConfig(**{**QUICK, **kwargs}), token=token, heartbeat=heartbeat)
        made.append(sender)
        return sender

    yield make
    for sender in made:
        sender.close(timeout=0.5)


def steps_sent(transport):
    return [r["step"] for r in transport.reports()]


def test_batches_are_bounded_and_ordered(senders):
    transport = RecordingTransport()
    sender = senders(transport, max_batch_reports=3, flush_interval_seconds=30.0)
    for i in range(7):
        sender.enqueue(report(i))
    assert sender.flush(timeout=10)
    assert steps_sent(transport) == list(range(7))
    assert all(len(json.loads(b)["reports"]) <= 3 for b in transport.bodies)
    assert all(json.loads(b)["schema_version"] == 1 for b in transport.bodies)
    assert sender.sent_total == 7 and sender.dropped_total == 0
    assert transport.headers[0]["Content-Type"] == "application/json"
    for body in transport.bodies:
        validate(body)


def test_dead_server_drops_oldest_and_counts(senders):
    alive = threading.Event()

    def respond(body):
        if not alive.is_set():
            raise httpx.ConnectError("connection refused")
        return 200, "{}"

    transport = RecordingTransport(respond)
    sender = senders(transport, queue_capacity=5)
    for i in range(20):
        sender.enqueue(report(i))
    wait_until(lambda: sender.failed_attempts_total >= 2)
    assert sender.dropped_total == 15
    assert sender.pending() == 5
    alive.set()
    assert sender.flush(timeout=10)
    delivered = [r["step"] for b in transport.bodies[-1:] for r in json.loads(b)["reports"]]
    assert delivered == [15, 16, 17, 18, 19]
    assert sender.sent_total == 5


def test_503_is_retried_until_it_succeeds(senders):
    answers = iter([(503, "busy"), (429, "slow down"), (200, "{}")])
    transport = RecordingTransport(lambda body: next(answers))
    sender = senders(transport)
    sender.enqueue(report(1))
    assert sender.flush(timeout=10)
    assert sender.failed_attempts_total == 2
    assert sender.sent_total == 1 and sender.rejected_total == 0
    assert len(transport.bodies) == 3
    assert transport.bodies[0] == transport.bodies[2]


def test_422_is_not_retried_and_logged_once(senders, caplog):
    rejection = {"accepted": 1, "rejected": [{"index": 1, "errors": [{"loc": ["step"], "msg": "bad", "type": "x"}]}]}
    transport = RecordingTransport(lambda body: (422, json.dumps(rejection)))
    sender = senders(transport, max_batch_reports=2, flush_interval_seconds=30.0)
    with caplog.at_level(logging.WARNING, logger="healthd_client"):
        for i in range(4):
            sender.enqueue(report(i))
        assert sender.flush(timeout=10)
    assert len(transport.bodies) == 2  # two batches, neither retried
    assert sender.sent_total == 2 and sender.rejected_total == 2
    assert sender.failed_attempts_total == 0
    logged = [r for r in caplog.records if "422" in r.getMessage()]
    assert len(logged) == 1 and "bad" in logged[0].getMessage()


def test_close_is_bounded_when_the_server_hangs(senders):
    sending, release, answered = threading.Event(), threading.Event(), threading.Event()

    def hang(body):
        sending.set()
        release.wait(60)
        answered.set()
        return 200, "{}"

    sender = senders(RecordingTransport(hang))
    sender.enqueue(report(1))
    assert sending.wait(10)  # the sender is blocked inside send()
    sender.close(timeout=0.2)
    assert not answered.is_set()  # close returned while the request still hung: it did not wait for it
    release.set()


def test_enqueue_never_raises(senders):
    transport = RecordingTransport()
    sender = senders(transport)
    sender.enqueue({"kind": "eval", "job": "j", "time": 1.0, "step": 0, "loss": object()})  # not JSON
    sender.enqueue(report(1))
    assert sender.flush(timeout=10)
    assert steps_sent(transport) == [1]
    assert sender.rejected_total == 1
    sender.close()
    sender.enqueue(report(2))  # after close: counted, not raised
    assert sender.dropped_total == 1


def test_nan_and_numpy_values_are_encoded(senders):
    np = pytest.importorskip("numpy")
    transport = RecordingTransport()
    sender = senders(transport)
    sender.enqueue({**report(0), "loss": float("nan"), "accuracy": np.float32(0.5)})
    assert sender.flush(timeout=10)
    body = transport.bodies[0]
    assert b"NaN" in body
    assert validate(body).reports[0].accuracy == 0.5


def test_heartbeats_are_sent_without_steps_and_carry_counters(senders):
    transport = RecordingTransport()
    sender = None

    def heartbeat(closing):
        return {"kind": "heartbeat", "job": "j", "rank": 0, "time": time.time(), "step": None,
                "reports_dropped_total": sender.dropped_total, "reports_sent_total": sender.sent_total,
                "closing": closing}

    sender = senders(transport, heartbeat=heartbeat, heartbeat_seconds=0.02)
    wait_until(lambda: len(transport.reports()) >= 3)
    sender.close()
    beats = transport.reports()
    assert [b["closing"] for b in beats][-1] is True
    assert not any(b["closing"] for b in beats[:-1])
    assert beats[-1]["reports_sent_total"] >= 2
    for body in transport.bodies:
        validate(body)


def test_close_gives_up_at_once_when_healthd_is_down_and_counts_what_it_drops(senders):
    attempts = []

    def refused(body):
        attempts.append(len(json.loads(body)["reports"]))
        raise httpx.ConnectError("[Errno 111] Connection refused")

    sender = senders(RecordingTransport(refused), close_timeout_seconds=3600.0)
    for i in range(5):
        sender.enqueue(report(i))
    wait_until(lambda: sender.failed_attempts_total >= 1)  # healthd is down, and the sender knows it
    before = len(attempts)
    sender.close()  # with a one-hour close timeout: it must not wait it out
    # One more try of what is queued (the closing heartbeat included), then everything is counted as dropped:
    # retrying with backoff until the deadline would keep a finished training process alive for an hour.
    assert len(attempts) - before == 1
    assert sender.pending() == 0 and sender.dropped_total == 5


def test_closing_heartbeat_is_sent_on_close(senders):
    transport = RecordingTransport()
    sender = senders(transport, heartbeat=lambda closing: {**report(0), "closing": closing})
    sender.enqueue(report(1))
    sender.close()
    assert transport.reports()[-1]["closing"] is True
    sender.close()  # idempotent


def test_http_transport_posts_to_the_reports_path():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"accepted": 1})

    transport = HttpTransport("http://healthd.test:9/", 1.0, httpx_transport=httpx.MockTransport(handler))
    sender = Sender(transport, MonitorConfig(**QUICK), token="tok")
    sender.enqueue(report(3))
    assert sender.flush(timeout=10)
    sender.close()
    (request,) = seen
    assert str(request.url) == "http://healthd.test:9/v1/reports"
    assert request.method == "POST"
    assert request.headers["authorization"] == "Bearer tok"
    assert json.loads(request.content)["reports"][0]["step"] == 3


def test_http_transport_connection_refused_is_retried(senders):
    from healthd.server.embedded import free_port  # a port nobody listens on

    transport = HttpTransport(f"http://127.0.0.1:{free_port()}", 1.0)
    sender = senders(transport)
    sender.enqueue(report(1))
    wait_until(lambda: sender.failed_attempts_total >= 2)
    assert sender.pending() == 1 and sender.dropped_total == 0


def test_forked_child_does_not_own_the_sender(senders):
    transport = RecordingTransport()
    sender = senders(transport, flush_interval_seconds=30.0)
    sender.enqueue(report(1))
    pid = os.fork()
    if pid == 0:  # child: must not send the parent's reports, must exit at once
        code = 1
        try:
            sender.enqueue(report(2))
            ok = sender.pending() == 0 and sender.flush(timeout=0.1)
            sender.close()
            code = 0 if ok else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert sender.flush(timeout=10)
    assert steps_sent(transport) == [1]


def test_forked_child_exits_cleanly_through_atexit(tmp_path):
    """A full program: attach, fork a worker that exits normally (atexit runs), close."""
    script = tmp_path / "fork_child.py"
    script.write_text(textwrap.dedent("""
        import os, sys, torch, healthd_client
        from healthd_client import MonitorConfig

        class T:
            def __init__(self): self.n = 0
            def send(self, body, headers):
                self.n += 1
                return 200, "{}"

        t = T()
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        monitor = healthd_client.attach(model, opt, job="j", transport=t,
                                        config=MonitorConfig(flush_interval_seconds=30.0))
        pid = os.fork()
        if pid == 0:
            monitor.step(loss=1.0)   # a no-op in the child
            sys.exit(0)              # atexit: monitor.close() and sender.close() must not hang
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        monitor.close()
        print("child", code, "sent", t.n)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "child 0 sent 1" in done.stdout


def test_the_client_writes_the_schema_version_the_server_reads() -> None:
    from healthd.wire.schema import SCHEMA_VERSION as server_version
    from healthd_client.transport import SCHEMA_VERSION as client_version

    assert client_version == server_version
