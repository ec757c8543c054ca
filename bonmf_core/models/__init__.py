"""The models: BoNMF (NeuMF fused with item content), the baselines, and their artifacts."""
