"""fisher_scale."""
