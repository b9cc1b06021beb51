"""The test rig: throwaway servers, waits, configs and listeners shared by the test
modules, tests/chaos.py and bench/. Not part of the package (nothing here ships)."""
