"""L1: transports and discovery behind one client interface (in-process and networked)."""
