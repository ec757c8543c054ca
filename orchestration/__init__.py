"""BoNMF's Dagster project: the asset graph from raw snapshot to promotion decision.

Load it with `dagster dev -m orchestration.definitions`, or run it in-process with
`orchestration.main.run_pipeline` (what `bonmf run` does). The work lives in `bonmf_core` and
`data_checks`; the assets here only wire them together and report metadata.
"""
