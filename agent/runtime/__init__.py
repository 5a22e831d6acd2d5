"""The agent process: its task group, timers, sync service, maintenance loops
and systemd supervision."""
