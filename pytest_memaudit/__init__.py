"""pytest-memaudit: audit memorization in vision encoders with UnitMem.

The library (``pytest_memaudit.pipeline.audit.run_audit``) works without pytest; the pytest plugin in
``pytest_memaudit.plugin`` is a thin layer over it. Importing this package imports no torch.
"""

__version__ = "0.1.0"
