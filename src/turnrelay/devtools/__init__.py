"""Developer tools shipped with the package: the fake LLM server for tests, demos and
benchmarks."""
