"""The audit's result (AuditResult, the one source of truth), its JSON both ways and the JSON schema.
May import: analysis, controls, models, data, metric, errors."""
