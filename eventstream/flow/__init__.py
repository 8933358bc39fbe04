"""eventstream.flow: dataflows in plain Python over the engine's log (docs/flows.md).

Flow, Stream            the builder (flow.py)
Tumbling, Hopping, Sliding, Session, WindowResult      windows (windows.py)
Count, Sum, Min, Max, Vector, Fold, Collect            aggregators (aggregators.py)
Joined                  what a windowed join emits (operators.py)
Bytes, Json, Text, Dtype    serde (serde.py)
Topic, Call, NatsSubject    output targets (sinks.py)
"""

from eventstream.flow.aggregators import Collect, Count, Fold, Max, Min, Sum, Vector
from eventstream.flow.flow import Flow, FlowError, Stream
from eventstream.flow.operators import Joined
from eventstream.flow.serde import Bytes, Dtype, Json, Text
from eventstream.flow.sinks import Call, NatsSubject, Topic
from eventstream.flow.windows import Hopping, Session, Sliding, Tumbling, WindowResult

__all__ = [
    "Bytes",
    "Call",
    "Collect",
    "Count",
    "Dtype",
    "Flow",
    "FlowError",
    "Fold",
    "Hopping",
    "Joined",
    "Json",
    "Max",
    "Min",
    "NatsSubject",
    "Session",
    "Sliding",
    "Stream",
    "Sum",
    "Text",
    "Topic",
    "Tumbling",
    "Vector",
    "WindowResult",
]
