"""The network: layer language, families, shapes and counts, the torch builder, summaries."""
