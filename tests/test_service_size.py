"""service.py only assembles and runs the engine and its edges: it stays small."""

from pathlib import Path

import eventstream.service


def test_service_module_is_under_200_lines():
    lines = Path(eventstream.service.__file__).read_text().count("\n")
    assert lines < 200, f"service.py has {lines} lines: move what is not assembly into the engine or an edge"
