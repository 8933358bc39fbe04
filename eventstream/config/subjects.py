"""Topics <-> NATS subjects, and topic globs -> NATS subject filters. Pure functions, no nats import.

A topic `orders.eu` is published on the subject `<prefix>.orders.eu`. NATS subjects are tokens
separated by `.`; a token may not be empty and a subject may not contain whitespace; `*` and `>` are
wildcards and may not appear in a published subject. A topic that breaks these rules is *refused*
(not rewritten: a rewrite could merge two topics into one subject): the sink dead-letters it with a
"connector: ..." reason, counted under the `connector` category.

Topic globs in `connectors.nats.sink.topics` and `connectors.nats.source.subjects` use NATS token
semantics (not fnmatch): `*` is exactly one whole token, a trailing `>` (or its alias `**`) is one or
more tokens. So `orders.*` matches `orders.eu` but not `orders.eu.paris`; `orders.>` matches both,
not `orders` itself; `>` matches every topic. Partial-token wildcards (`ord*`, `?`, `[..]`) cannot be
expressed as NATS filters and are refused by configuration validation.
"""

from __future__ import annotations

import re

_WS = re.compile(r"\s")
_NAME_BAD = re.compile(r"[\s.*>/\\]")  # stream and durable names


def subject_problem(subject: str, *, wildcards: bool = False) -> str | None:
    """Why `subject` is not a valid NATS subject (None when it is)."""
    if not subject:
        return "empty subject"
    if _WS.search(subject):
        return "whitespace is not allowed in NATS subjects"
    tokens = subject.split(".")
    for i, tok in enumerate(tokens):
        if tok == "":
            return "empty token (leading, trailing or doubled '.')"
        if tok in ("*", ">"):
            if not wildcards:
                return f"wildcard token {tok!r} is not allowed in a published subject"
            if tok == ">" and i != len(tokens) - 1:
                return "'>' is only allowed as the last token"
            continue
        if "*" in tok or ">" in tok:
            return f"token {tok!r} mixes a wildcard with other characters"
    return None


def topic_subject(prefix: str, topic: str) -> tuple[str | None, str | None]:
    """(subject, None) for a topic that maps, else (None, reason) with a "connector: ..." reason."""
    problem = subject_problem(topic)
    if problem is not None:
        return None, f"connector: topic {topic[:80]!r} cannot be a NATS subject: {problem}"
    return f"{prefix}.{topic}", None


def subject_topic(prefix: str, subject: str) -> str | None:
    """The topic of a subject under `prefix` (None if the subject is not under it)."""
    head = prefix + "."
    if not subject.startswith(head) or len(subject) == len(head):
        return None
    return subject[len(head) :]


def glob_problem(glob: str) -> str | None:
    """Why a topic glob cannot be a NATS filter (None when it can)."""
    if not isinstance(glob, str) or not glob:
        return "an empty glob"
    if any(c in glob for c in "?[]"):
        return "'?' and '[...]' have no NATS equivalent; use whole-token '*' or a trailing '>'"
    tokens = glob.split(".")
    if tokens[-1] == "**":
        tokens[-1] = ">"
    if "**" in tokens:
        return "'**' is only allowed as the last token (it means '>')"
    return subject_problem(".".join(tokens), wildcards=True)


def glob_filter(prefix: str, glob: str) -> str:
    """The NATS subject filter for a (valid) topic glob under `prefix`."""
    tokens = glob.split(".")
    if tokens[-1] == "**":
        tokens[-1] = ">"
    return f"{prefix}." + ".".join(tokens)


def glob_matches(glob: str, topic: str) -> bool:
    """Does `topic` match the glob, with NATS token semantics (see the module docstring)?"""
    g = glob.split(".")
    if g[-1] == "**":
        g[-1] = ">"
    t = topic.split(".")
    for i, tok in enumerate(g):
        if tok == ">":
            return len(t) > i
        if i >= len(t):
            return False
        if tok != "*" and tok != t[i]:
            return False
    return len(t) == len(g)


def name_problem(name: str) -> str | None:
    """Why a stream or durable consumer name is not allowed (None when it is)."""
    if not name:
        return "an empty name"
    if _NAME_BAD.search(name):
        return "names may not contain whitespace, '.', '*', '>', '/' or '\\'"
    return None


def check_config(cfg, source: str) -> None:
    """Validate `connectors.*` (called by the config loader); errors name the key."""
    from eventstream.config.schema import ConfigError

    n = cfg.connectors.nats
    key = "connectors.nats"
    if n.enabled and not n.servers:
        raise ConfigError(source, f"{key}.servers", n.servers, "a non-empty list of nats:// URLs")
    for i, url in enumerate(n.servers):
        if not url or _WS.search(url):
            raise ConfigError(source, f"{key}.servers[{i}]", url, "a URL such as nats://127.0.0.1:4222")
    for sub in ("stream", "source.durable"):
        obj = n.source if sub.startswith("source.") else n
        value = getattr(obj, sub.split(".")[-1])
        problem = name_problem(value)
        if problem:
            raise ConfigError(source, f"{key}.{sub}", value, f"a JetStream name ({problem})")
    problem = subject_problem(n.subject_prefix)
    if problem:
        raise ConfigError(
            source, f"{key}.subject_prefix", n.subject_prefix, f"a NATS subject without wildcards ({problem})"
        )
    for field, globs in (("sink.topics", n.sink.topics), ("source.subjects", n.source.subjects)):
        if not globs:
            raise ConfigError(source, f"{key}.{field}", globs, "a non-empty list of topic globs (e.g. ['>'])")
        for i, g in enumerate(globs):
            problem = glob_problem(g)
            if problem:
                raise ConfigError(
                    source,
                    f"{key}.{field}[{i}]",
                    g,
                    f"a topic glob with whole-token '*' and a trailing '>' or '**' ({problem})",
                )
