"""What users touch: the HTTP API, metrics, the command line and the demo."""
