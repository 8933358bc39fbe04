"""Sessionizing clicks: one summary per user session (clicks closer than 30 s belong together).

Clicks arrive as JSON on `clicks` ({"user": "u1", "page": "/home"}). Per user, a session lasts while
clicks keep coming within 30 s of each other; when the watermark passes the last click + 30 s the
session is emitted to `clicks.sessions` with its pages in order and its length.

    python examples/sessions.py
    PYTHONPATH=. .venv/bin/eventstream serve --set 'flows.builders=["examples.sessions:build"]'
"""

from __future__ import annotations

from eventstream.flow import Collect, Flow, Json, Session


def build() -> Flow:
    flow = Flow("sessions", ["clicks"], serde=Json())
    (flow.key_by(lambda c: c["user"], name="by_user")
         .window(Session(30), Collect(), max_out_of_orderness=2, name="session")
         .map(lambda s: {"user": s.key, "start_ns": s.start, "seconds": (s.end - s.start) / 1e9 - 30,
                         "pages": [c["page"] for c in s.value]}, name="summary")
         .to("clicks.sessions"))
    return flow


def sample():
    from eventstream.testing import Event

    t0 = 1_700_000_000
    return [Event({"user": "u1", "page": "/home"}, t0), Event({"user": "u2", "page": "/home"}, t0 + 3),
            Event({"user": "u1", "page": "/shoes"}, t0 + 12), Event({"user": "u1", "page": "/cart"}, t0 + 35),
            Event({"user": "u2", "page": "/help"}, t0 + 100), Event({"user": "u1", "page": "/home"}, t0 + 200)]


def main() -> None:
    from eventstream.testing import run_flow

    for s in run_flow(build(), sample())["clicks.sessions"]:
        print(s)


if __name__ == "__main__":
    main()
