"""The benchmark harness: ``python -m tests.bench [--quick]``. Not part of the test run (no ``test_*`` files)."""
