"""Applications on top of the library: the benchmark, the command line, the registry of benchmark
settings. No library logic lives here: each module composes the layers below."""
