"""Per-minute totals per customer on event time, with late data.

Orders arrive as JSON on `orders.*` ({"customer": "c1", "amount": 12.5}), each carrying the producer's
timestamp_ns. The flow sums the amounts per customer and minute of *event* time, lets events be up to
5 s out of order, keeps a window open 10 s more for stragglers (allowed_lateness), and sends anything
later than that to the topic `orders.late` (nothing is dropped). Results go to `orders.totals`.

    python examples/minute_totals.py          # runs the flow over sample orders, prints its outputs
    # in the engine (from the repository root):
    PYTHONPATH=. .venv/bin/eventstream serve --set 'flows.builders=["examples.minute_totals:build"]'
"""

from __future__ import annotations

from eventstream.flow import Flow, Json, Sum, Tumbling


def build() -> Flow:
    flow = Flow("minute_totals", ["orders.*"], serde=Json())
    (flow.filter(lambda o: o.get("amount", 0) > 0, name="paid")
         .key_by(lambda o: o["customer"], name="by_customer")
         .window(Tumbling(60), Sum(each=lambda o: o["amount"]), max_out_of_orderness=5, allowed_lateness=10,
                 late="orders.late", name="per_minute")
         .map(lambda r: {"customer": r.key, "minute_start_ns": r.start, "total": round(r.value, 2)}, name="row")
         .to("orders.totals"))
    return flow


def sample():
    """Orders (value, event time in seconds since the epoch)."""
    from eventstream.testing import Event

    t0 = 1_700_000_040  # a minute boundary
    return [Event({"customer": "c1", "amount": 10.0}, t0 + 1), Event({"customer": "c2", "amount": 4.5}, t0 + 20),
            Event({"customer": "c1", "amount": 2.5}, t0 + 59), Event({"customer": "c1", "amount": 7.0}, t0 + 66),
            Event({"customer": "c2", "amount": 1.0}, t0 + 58),  # out of order, in time
            Event({"customer": "c1", "amount": 0.0}, t0 + 70),  # filtered out (not paid)
            Event({"customer": "c2", "amount": 3.0}, t0 + 80),  # watermark 75: minute 0 fires
            Event({"customer": "c1", "amount": 5.0}, t0 + 30),  # late: to orders.late
            Event({"customer": "c2", "amount": 2.0}, t0 + 130)]


def main() -> None:
    from eventstream.testing import run_flow

    out = run_flow(build(), sample())
    for row in out["orders.totals"]:
        print("total", row)
    for row in out["orders.late"]:
        print("late ", row)


if __name__ == "__main__":
    main()
