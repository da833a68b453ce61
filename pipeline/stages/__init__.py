"""Pipeline stages: one module per stage, each exposing `run(ctx) -> metrics`."""
