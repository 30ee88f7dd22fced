"""Benchmark scripts and the code only they use: the three-call baseline loop, timing and parity."""
