"""Helpers of the test suite only (not part of the installed packages).

Importable as ``tests.helpers`` because ``[tool.pytest.ini_options] pythonpath = ["."]`` puts the
repository root on ``sys.path``. The fakes that benchmarks also use stay in the packages
(``lens_cache.testing``, ``lens_train.testing``).
"""
