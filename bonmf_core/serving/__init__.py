"""Serving without BentoML: the serving bundle and the runtime engine."""
