"""The metric: UnitMem per unit, unit selection, the statistics, membership tests and the verdict.
May import: errors only (numpy, scipy, torch for the values)."""
