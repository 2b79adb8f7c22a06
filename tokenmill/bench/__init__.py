"""L3: load generators, trace readers and benchmarks."""
