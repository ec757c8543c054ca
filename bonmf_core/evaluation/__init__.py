"""Evaluation: ranking metrics over score matrices and the protocol-aware evaluator."""
