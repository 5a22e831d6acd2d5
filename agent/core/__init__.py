"""Pure protocol rules and state machines: no sockets, tasks, clocks, files or
global randomness. Time and random generators come in as arguments."""
