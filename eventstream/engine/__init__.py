"""The engine: `Engine` (engine.py: ports `offer` and `stored`), the bus, processors, dead-letter log,
control plane and the manager that runs the processors."""
