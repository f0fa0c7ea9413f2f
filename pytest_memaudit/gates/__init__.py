"""The gates: the YAML audit file read safely, thresholds, the comparison with a baseline, stored baselines.
May import: pipeline, results and every layer below, errors."""
