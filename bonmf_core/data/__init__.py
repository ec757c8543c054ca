"""Data: the Dataset, its readers, raw snapshots, the demo dataset and the evaluation splits."""
