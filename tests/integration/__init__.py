"""Integration tests.  A package so that their module names (integration.test_x)
do not clash with unit tests of the same file name (tests/unit/test_x.py)."""
