"""Packaging: the production model as a BentoML model, a Bento and its archive."""

import time

import dagster as dg

from bonmf_core.ops import registry

from ..resources import ParamsResource, StateResource, StoreResource


class PackagingConfig(dg.Config):
    """Whether to build the Bento (off: only the BentoML model is saved). The encoders packaged
    with the model are the configuration's `encoders` section — the encoding assets' own, since
    a content model's features must be what they produce (packaging refuses otherwise)."""

    build: bool = True


@dg.asset(group_name="packaging", kinds={"bentoml"},
          description="The production model saved into the BentoML model store (weights, id "
                      "maps, titles, popularity, seen items, catalog embeddings, encoders), "
                      "built into a Bento from bentos/service.py offline and exported as a "
                      ".bento.tar archive under <state>/artifacts/bento. Nothing is rebuilt when "
                      "the production model has not changed; the BentoML tag is recorded in "
                      "the registry.")
def bento_package(context: dg.AssetExecutionContext, config: PackagingConfig,
                  promotion_decision: dict, validated_dataset: dict, params: ParamsResource,
                  state: StateResource, store: StoreResource) -> dg.MaterializeResult:
    from bentos.packaging import configure_bentoml, model_info, package
    from bonmf_core.data.dataset import find_saved_dataset

    started = time.perf_counter()
    with store.open() as s:
        production = registry.production_model(s)
    if production is None:
        context.log.info("no production model: nothing to package")
        return dg.MaterializeResult(value={"packaged": False},
                                    metadata={"status": "no production model yet"})
    configure_bentoml(state.path)
    # The production model may come from an earlier run (the gate held this one's candidate).
    dataset_dir = (validated_dataset["path"]
                   if validated_dataset["dataset_hash"] == production["dataset_hash"]
                   else find_saved_dataset(state.path / "datasets",
                                           production["dataset_hash"]))
    record = package(state.production_dir, dataset_dir, state.folder("artifacts", "bento"),
                     params.load(), model_info(production),
                     build=config.build)
    with store.open() as s:
        registry.set_bento_tag(s, production["id"], record["model_tag"])
    context.log.info(f"model version {production['id']} → {record['model_tag']}"
                     + (f", bento {record['bento_tag']}" if "bento_tag" in record else "")
                     + (" (unchanged, reused)" if record["reused"] else ""))
    metadata = {"model_version": production["id"], "bento_model_tag": record["model_tag"],
                "reused": record["reused"], "bentoml_home": record["bentoml_home"],
                "seconds": dg.MetadataValue.float(round(time.perf_counter() - started, 3))}
    if "bento_tag" in record:
        metadata.update(bento_tag=record["bento_tag"],
                        archive=dg.MetadataValue.path(record["archive"]),
                        archive_sha256=record["archive_sha256"],
                        archive_bytes=int(record["archive_bytes"]),
                        archive_mb=dg.MetadataValue.float(round(record["archive_bytes"] / 2**20, 2)),
                        serve=f"BENTOML_HOME={record['bentoml_home']} bentoml serve "
                              f"{record['bento_tag']} --host 127.0.0.1")
    return dg.MaterializeResult(value={"packaged": True, **record}, metadata=metadata)
