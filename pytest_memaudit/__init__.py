"""pytest-memaudit: audit memorization in vision encoders with UnitMem.

The library works without pytest: ``from pytest_memaudit import run_audit, make_settings`` (the
names below, imported on first use, so that importing this package imports no torch). The pytest
plugin (``pytest_memaudit.plugin``) is a thin layer over it. The layers, lowest first: ``metric``,
``data``, ``models``, ``controls``, ``analysis``, ``results``, ``pipeline``, ``gates``, ``report``,
``plugin``; each imports only those before it (``tests/test_layers.py``).
"""

import importlib

__version__ = "0.1.0"

# The public API: name -> the module that defines it.
PUBLIC = {
    "run_audit": "pipeline.audit",
    "run_series": "pipeline.audit",
    "make_settings": "pipeline.settings",
    "RunSettings": "pipeline.settings",
    "load_audit_file": "gates.config",
    "evaluate_result": "gates.thresholds",
    "evaluate": "gates.thresholds",
    "AuditResult": "results.result",
    "read_results": "results.result",
    "write_report": "report",
    "get_model_spec": "models",
    "ModelSpec": "models",
    "AuditError": "errors",
}
__all__ = ["__version__", *PUBLIC]


def __getattr__(name: str):
    if name not in PUBLIC:
        raise AttributeError(f"module 'pytest_memaudit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{PUBLIC[name]}"), name)
    globals()[name] = value
    return value
