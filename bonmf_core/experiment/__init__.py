"""Experiments: the variants, the one runner (split → fit → evaluate) and its reports."""
