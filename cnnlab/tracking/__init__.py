"""MLflow: the store, the writer that training uses, the reader that results use, provenance."""
