"""The benchmark's phases, one module each; bench/run.py runs them in order."""
