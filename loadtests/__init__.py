"""Load tests (Locust users per protocol, a headless runner) and the benchmark harness."""
