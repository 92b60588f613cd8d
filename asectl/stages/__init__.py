"""One module per pipeline stage; each exposes a plain ``run_*`` function the CLI and ``predict`` share."""
