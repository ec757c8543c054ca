"""Versioning: after a promotion, the production model and its dataset go to DVC.

The asset copies them into the DVC workspace (`promoted/`), pushes them to the remote, commits
the pointer files (to the `bonmf/registry` branch by default, tagged `model@vN`: the branch you
work on never moves) and records the content hashes in the registry (`model_versions.dvc_json`)
and in its metadata — so every promoted version points to the exact data and model that made
it, restorable with `bonmf restore --version N` or `--rev REV`. The work is in
`bonmf_core.ops.versioning`, which serializes DVC operations with a lock on the workspace.
"""

import dagster as dg

from bonmf_core.ops import registry, versioning

from ..resources import ParamsResource, StateResource, StoreResource


def _skipped(reason: str, **metadata) -> dg.MaterializeResult:
    return dg.MaterializeResult(value={"versioned": False, "reason": reason},
                                metadata={"versioned": False, "reason": reason, **metadata})


@dg.asset(group_name="versioning", kinds={"dvc"},
          description="After a promotion: the production model and the dataset it was trained "
                      "on, tracked with DVC (promoted/), pushed to the DVC remote and committed "
                      "to the registry branch (dvc.git_branch, never your current one) with a "
                      "tag per version (dvc.git_tag); "
                      "their content hashes recorded in the registry. Skips versions already "
                      "versioned, and states why when versioning is off or no DVC repository "
                      "holds the state folder.")
def versioned_artifacts(context: dg.AssetExecutionContext, promotion_decision: dict,
                        params: ParamsResource, state: StateResource,
                        store: StoreResource) -> dg.MaterializeResult:
    settings = params.load().dvc
    with store.open() as s:
        production = registry.production_model(s)
    if production is None:
        return _skipped("no production model")
    if production["dvc"]:
        return _skipped(f"model version {production['id']} is already versioned",
                        git_rev=str(production["dvc"].get("git_rev")),
                        model_md5=production["dvc"]["model"]["md5"])
    if not settings.push_after_promotion:
        return _skipped("dvc.push_after_promotion is off")
    try:
        repo = versioning.find_repo(settings, state.path)
        if repo is None:
            return _skipped(f"no DVC repository holds the state folder {state.path} "
                            f"(set dvc.repo)")
        hashes = versioning.version_promotion(
            repo, state.path, settings,
            dataset_dir=versioning.find_dataset(state.path / "datasets",
                                                production["dataset_hash"]),
            model_dir=state.production_dir, version=production["id"],
            message=f"bonmf: model version {production['id']} ({production['variant']}, "
                    f"dataset {production['dataset_hash']}) promoted")
    except versioning.VersioningError as exc:
        raise dg.Failure(str(exc)) from exc
    with store.open() as s:
        registry.record_dvc_hashes(s, production["id"], hashes)
    context.log.info(f"model version {production['id']}: dataset {hashes['dataset']['md5']}, "
                     f"model {hashes['model']['md5']}, git {hashes['git_rev']}")
    return dg.MaterializeResult(
        value={"versioned": True, "model_version": production["id"], **hashes},
        metadata={"versioned": True, "model_version": production["id"],
                  "dataset_md5": hashes["dataset"]["md5"], "model_md5": hashes["model"]["md5"],
                  **{f"{name}_{k}": int(hashes[name][k]) for name in versioning.ARTIFACTS
                     for k in ("nfiles", "size") if hashes[name].get(k) is not None},
                  "git_rev": str(hashes["git_rev"]),
                  **{k: hashes[k] for k in ("git_branch", "git_tag") if hashes.get(k)},
                  "remote": hashes["remote"]["url"],
                  "repo": dg.MetadataValue.path(str(repo)),
                  "seconds": dg.MetadataValue.float(float(hashes["seconds"]))})
