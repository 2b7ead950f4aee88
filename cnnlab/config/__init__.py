"""The Hydra config: composing it, its schema, and the checks that run before any work."""
