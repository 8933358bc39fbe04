"""Subscribers over the wire: SUBSCRIBE/CREDIT/DELIVER/COMMIT (docs/protocol.md, "Subscribe").

server.py (listener), session.py (one connection), groups.py (consumer groups, committed offsets);
the log is followed by storage/tail.py.
"""
