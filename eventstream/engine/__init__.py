"""The engine: dispatcher, bus, processors, dead-letter log, control plane and the manager that wires them."""
