"""Assets by stage: ingest → encoding → training → evaluation → promotion → packaging."""

from .encoding import image_embeddings, text_embeddings
from .evaluation import offline_evaluation
from .ingest import dataset_snapshot, validated_dataset
from .packaging import bento_package
from .promotion import promotion_decision
from .training import baselines, bonmf_candidate, splits
from .versioning import versioned_artifacts

ALL_ASSETS = [dataset_snapshot, validated_dataset, text_embeddings, image_embeddings, splits,
              bonmf_candidate, baselines, offline_evaluation, promotion_decision,
              bento_package, versioned_artifacts]
