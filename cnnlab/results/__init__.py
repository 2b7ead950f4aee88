"""What logged runs say: comparisons, statistics, plots, reports, reproductions, audits."""
