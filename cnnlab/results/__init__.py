"""Reading logged results back: seed statistics and comparisons of variants."""
