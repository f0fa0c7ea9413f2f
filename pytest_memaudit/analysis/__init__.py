"""The analysis of an audit's values: which data points are memorized, their characteristics' correlations, clusters.
May import: data, metric, errors."""
