"""The retraining job: every asset and its checks, snapshot to promotion decision."""

import dagster as dg

retrain_job = dg.define_asset_job(
    "retrain", selection=dg.AssetSelection.all(),
    description="Ingest → checks → encode → train → evaluate → promote (the whole graph).")
