"""Evaluation tasks shared by the tests and the benchmark commands."""
