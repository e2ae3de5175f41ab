"""Search strategies and the epoch loop (`run_search`)."""
