"""L4: CLI, configuration, process spawning and wiring."""
