"""Statistics over finished runs: sequential (anytime-valid) comparisons of variants."""
