"""Enriching one stream by a windowed join with another: orders with the customer's latest profile.

Orders ({"customer": "c1", "order": 17, "amount": 9.5}) and profile updates ({"customer": "c1",
"tier": "gold"}) arrive as JSON on `shop.orders` and `shop.profiles`. Both are keyed by customer and
joined per 1-minute window (how="left": an order without a profile update in its minute still comes
out, with tier None). Results go to `shop.enriched`.

    python examples/enrich_join.py
    PYTHONPATH=. .venv/bin/eventstream serve --set 'flows.builders=["examples.enrich_join:build"]'
"""

from __future__ import annotations

from eventstream.flow import Flow, Json, Tumbling


def build() -> Flow:
    flow = Flow("enrich", ["shop.orders", "shop.profiles"], serde=Json())
    orders = flow.filter(lambda v: "order" in v, name="orders").key_by(lambda v: v["customer"], name="order_key")
    profiles = flow.filter(lambda v: "tier" in v, name="profiles").key_by(lambda v: v["customer"],
                                                                          name="profile_key")
    (orders.join(profiles, Tumbling(60), how="left", max_out_of_orderness=5, name="join")
           .map(lambda j: {"order": j.left["order"], "customer": j.key, "amount": j.left["amount"],
                           "tier": j.right["tier"] if j.right else None}, name="enriched")
           .to("shop.enriched"))
    return flow


def sample():
    from eventstream.testing import Event

    t0 = 1_700_000_040
    return [Event({"customer": "c1", "tier": "gold"}, t0 + 1, "shop.profiles"),
            Event({"customer": "c1", "order": 1, "amount": 9.5}, t0 + 5, "shop.orders"),
            Event({"customer": "c2", "order": 2, "amount": 3.0}, t0 + 7, "shop.orders"),
            Event({"customer": "c1", "order": 3, "amount": 1.0}, t0 + 50, "shop.orders"),
            Event({"customer": "c2", "tier": "silver"}, t0 + 65, "shop.profiles"),
            Event({"customer": "c2", "order": 4, "amount": 8.0}, t0 + 70, "shop.orders")]


def main() -> None:
    from eventstream.testing import run_flow

    for row in run_flow(build(), sample())["shop.enriched"]:
        print(row)


if __name__ == "__main__":
    main()
