"""BoNMF packaging (BentoML) and the recommendation service."""
