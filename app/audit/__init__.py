"""The audit trail: who changed or checked which connector, when, which fields, with what outcome."""
