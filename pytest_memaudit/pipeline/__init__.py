"""The audit's pipeline: run settings, device and memory, views, the stages (shard, stream, merge, finalize), snapshots.
May import: results, analysis, controls, models, data, metric, errors."""
