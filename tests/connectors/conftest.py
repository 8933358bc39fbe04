"""Fixtures for connector tests (helpers live in nats_fixtures.py)."""

from __future__ import annotations

from nats_fixtures import nats_server  # noqa: F401 - fixture
