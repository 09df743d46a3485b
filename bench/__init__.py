"""sugard's benchmarks: `python -m bench` (see bench/run.py), and bench/bench_client.py."""
