"""The one configuration: every hyper-parameter's default, type, range and allowed values.

Precedence, the same for every entry point (`bonmf run`, `bonmf stage …` under `dvc repro`,
`bonmf package`, `benchmarks/*.py`, launches from the Dagster UI):

    schema defaults (this module)  <  params file  <  --set section.key=value  <  explicit flags

The params file is `--params FILE`, else `$BONMF_PARAMS`, else `./params.yaml` when it exists,
else none (the defaults alone). Unknown keys are refused by file and key path, and so are
values of the wrong type or out of range. Library code takes these models (or one section of
them); no other module writes a default for a params key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bonmf_core.errors import ConfigError

PARAMS_FILE = "params.yaml"
METRIC_PATTERN = r"^(hr|ndcg|recall)@[1-9][0-9]*$"
BONMF_VARIANTS = ("id", "text", "image", "text+image")
BASELINE_VARIANTS = ("pop", "bpr", "genre_pop", "content_knn", "ease", "item_knn", "mf")
Metric = str  # "hr@10", "ndcg@20", "recall@50": validated by METRIC_PATTERN


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ColumnsConfig(Section):
    """Column names of a generic dataset folder (interactions.csv|parquet, items.…, users.…).
    A `dataset.yaml` beside the files may rename them too; it travels with the data, so it
    wins over these."""

    user_id: str = "user_id"
    item_id: str = "item_id"
    rating: str | None = Field("rating", description="null or an absent column = implicit "
                                                     "feedback")
    timestamp: str | None = Field("timestamp", description="null or absent = no time order")
    title: str = "title"
    genres: str | None = "genres"
    text: list[str] = Field(default_factory=lambda: ["text"],
                            description="free-text item columns (absent ones are skipped)")
    image_path: str | None = Field("image_path", description="relative to the dataset folder")
    user_attributes: list[str] = Field(default_factory=list,
                                       description="users-table columns used as attributes; "
                                                   "empty = every other column")


class DataConfig(Section):
    source: str = Field("demo", description="demo | a MovieLens-1M directory | a generic "
                                            "folder (interactions.csv|parquet) | a saved "
                                            "dataset directory")
    demo_seed: int = 0
    demo_users: int = Field(3000, ge=10)
    demo_items: int = Field(1000, ge=10)
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig)
    encoding: str = Field("utf-8", description="text encoding of a generic folder's CSV files "
                                               "(a leading BOM is accepted)")
    rating_scale: tuple[float, float] | None = Field(None, description="[low, high] of a generic "
                                                                       "folder's ratings")


# After early stopping (`training.train_with_refit`): retrain, continue one epoch, or keep.
Refit = bool | Literal["continue"]
ProtocolName = Literal["ncf", "full", "cold_items", "cold_users"]
PROTOCOLS: tuple[str, ...] = get_args(ProtocolName)


class ProtocolConfig(Section):
    name: ProtocolName = "ncf"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    ks: list[int] = Field(default_factory=lambda: [10], min_length=1)
    ncf_dir: str | None = Field(None, description="canonical NCF test files, e.g. "
                                                  "../shared/datasets/ml-1m-ncf")
    order: Literal["random", "temporal"] = Field("random", description="full protocol")
    min_rating: float | None = Field(
        None, description="full protocol: interactions rated below this are dropped before "
                          "the split (3 = RecBole's ML-1M setup); null = every rating counts")
    cold_fraction: float = Field(0.2, gt=0, lt=1, description="cold_items protocol")
    cold_user_fraction: float = Field(
        0.2, gt=0, lt=1, description="cold_users protocol: share of the users held out of "
                                     "training entirely (seeded); another 10% validate")
    given: list[int] = Field(
        default_factory=lambda: [3], min_length=1,
        description="cold_users protocol: earliest interactions each held-out user reveals; "
                    "a list reports each, the first is the headline (gate, early stopping)")
    head_share: float = Field(
        0.2, gt=0, le=1, description="popularity slices: `head` = the most popular items (by "
                                     "training interactions) until they hold this share of "
                                     "the training interactions")
    tail_max_interactions: int = Field(
        20, ge=0, description="popularity slices: `tail` = items with at most this many "
                              "training interactions (cold items included); `torso` = the rest")

    @field_validator("ks")
    @classmethod
    def _positive_ks(cls, ks: list[int]) -> list[int]:
        if any(k < 1 for k in ks):
            raise ValueError(f"every k must be >= 1, got {ks}")
        return ks

    @field_validator("given", mode="before")
    @classmethod
    def _given_list(cls, given):
        return [given] if isinstance(given, int) else given   # `--set protocol.given=5`

    @field_validator("given")
    @classmethod
    def _positive_given(cls, given: list[int]) -> list[int]:
        if any(g < 1 for g in given) or len(set(given)) != len(given):
            raise ValueError(f"given must be distinct counts >= 1, got {given}")
        return given


class ModelConfig(Section):
    head: Literal["neumf", "dot"] = Field(
        "dot", description="neumf = GMF ⊕ MLP (the paper's); dot = <user, item> + user, "
                             "item and global biases (tuned MF, Rendle et al. 2020)")
    gmf_dim: int = Field(64, ge=1, description="GMF width; the dot head's embedding width")
    mlp_layers: list[int] = Field(default_factory=lambda: [128, 64, 32], min_length=1,
                                  description="first entry = user ⊕ item embedding width "
                                              "(neumf head only)")
    content_hidden: int = Field(0, ge=0, description="hidden width of each content "
                                "modality's projection (0 = one linear map)")
    content_dim: int | dict[Literal["text", "image"], int] = Field(
        default_factory=lambda: {"text": 128, "image": 32},
        description="PCA width of each content modality before its projection (0 = keep); "
                    "a mapping gives each modality its own, e.g. {text: 128, image: 32}")
    id_dropout: float = Field(0.3, ge=0, lt=1, description="only where content exists")
    content_weight_grid: list[float] = Field(
        default_factory=lambda: [0.0, 0.5, 1.0], min_length=1,
        description="weights each content modality's vector may get when scoring, the "
                    "combination chosen on validation after training ([1] = off)")
    dropout: float = Field(0.0, ge=0, lt=1)
    user_attributes: bool = Field(False, description="user attribute embeddings where the "
                                                     "dataset has them")

    @field_validator("content_weight_grid")
    @classmethod
    def _weights_in_range(cls, weights: list[float]) -> list[float]:
        if any(not 0 <= w <= 4 for w in weights):
            raise ValueError("content_weight_grid must lie in [0, 4]")
        return weights

    @field_validator("content_dim")
    @classmethod
    def _widths_for_every_modality(cls, dim: int | dict) -> int | dict:
        widths = dim.values() if isinstance(dim, dict) else [dim]
        if any(w < 0 for w in widths):
            raise ValueError("content_dim must be >= 0 (0 = keep the encoder's width)")
        if isinstance(dim, dict) and set(dim) != {"text", "image"}:
            raise ValueError("a content_dim mapping names text and image, e.g. "
                             "{text: 128, image: 32}")
        return dim

    @field_validator("mlp_layers")
    @classmethod
    def _even_first_layer(cls, layers: list[int]) -> list[int]:
        if layers[0] % 2 or any(w < 1 for w in layers):
            raise ValueError("mlp_layers must be positive and the first one even "
                             "(it is user ⊕ item embedding width)")
        return layers


class TrainConfig(Section):
    """How a BoNMF model is trained (the BPR-MF baseline's schedule is `BprConfig`)."""

    loss: Literal["bce", "bpr", "softmax"] = Field(
        "bce", description="bce = logistic per item (NCF); bpr = pairwise; softmax = the "
                           "positive's cross-entropy among its negatives (sampled softmax)")
    negatives: int = Field(8, ge=1, description="sampled negatives per positive")
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(8192, ge=1)
    lr: float = Field(0.002, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    embedding_reg: float = Field(0.0025, ge=0, description="L2 on each batch's user/item "
                                                           "vectors")
    optimizer: Literal["adam", "adagrad", "sgd"] = Field(
        "adam", description="adam | adagrad (lr on the batch's mean loss) | sgd (lr per "
                            "training pair: per-example SGD, Rendle et al.'s 0.002, for the "
                            "embedding tables; shared layers such as the content "
                            "projections take Adam at the same lr)")
    lr_decay: float = Field(1.0, gt=0, le=1, description="learning rate × this every epoch")
    patience: int = Field(5, ge=1, description="epochs without validation gain before "
                                               "stopping")
    metric: Metric = Field("ndcg@10", pattern=METRIC_PATTERN,
                           description="validation metric for early stopping and the "
                                       "candidate choice")
    refit: Refit = Field(True, description="after early stopping: true = retrain a fresh model "
                                           "on train + valid for the best epochs; continue = "
                                           "one more epoch of the early-stopped model on "
                                           "train + valid; false = keep it")

    @property
    def metric_k(self) -> int:
        return int(self.metric.split("@")[1])


class BprConfig(Section):
    """The BPR-MF baseline: its dimension and its own schedule."""

    dim: int = Field(64, ge=1)
    negatives: int = Field(4, ge=1)
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(8192, ge=1)
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    embedding_reg: float = Field(0.001, ge=0)
    lr_decay: float = Field(0.85, gt=0, le=1)
    patience: int = Field(3, ge=1)
    refit: Refit = True

    def as_train(self, metric: str) -> TrainConfig:
        """This schedule as a TrainConfig (pairwise loss, early-stopping on `metric`): every
        field is set here, none taken from TrainConfig's defaults."""
        return TrainConfig(loss="bpr", metric=metric, **self.model_dump(exclude={"dim"}))


class EaseConfig(Section):
    """The EASE baseline (Steck 2019): its L2 strength λ is picked on the validation set."""

    lambdas: list[float] = Field(default_factory=lambda: [10.0, 50.0, 100.0, 250.0, 500.0,
                                                          1000.0, 2500.0], min_length=1,
                                 description="λ grid searched on the validation set (the first "
                                             "when there is none)")
    max_memory_mb: float = Field(4096.0, gt=0, description="refuse catalogs whose dense "
                                                           "item × item matrices need more")
    refit: bool = Field(True, description="with the chosen λ, refit on train + valid")

    @field_validator("lambdas")
    @classmethod
    def _positive(cls, lambdas: list[float]) -> list[float]:
        if any(v <= 0 for v in lambdas):
            raise ValueError(f"every λ must be > 0, got {lambdas}")
        return lambdas


class ItemKnnConfig(Section):
    """The item-KNN baseline (cosine over the binary interactions): its neighbour count is
    picked on the validation set."""

    neighbours: list[int | None] = Field(
        default_factory=lambda: [20, 50, 100, 200, None], min_length=1,
        description="neighbours kept per item, searched on the validation set (the first "
                    "when there is none); null = every item")
    max_memory_mb: float = Field(4096.0, gt=0, description="refuse catalogs whose dense "
                                                           "item × item matrices need more")
    refit: bool = Field(True, description="with the chosen count, refit on train + valid")

    @field_validator("neighbours")
    @classmethod
    def _positive(cls, ks: list[int | None]) -> list[int | None]:
        if any(k is not None and k < 1 for k in ks):
            raise ValueError(f"every neighbour count must be >= 1 or null, got {ks}")
        return ks


class MfConfig(Section):
    """The `mf` baseline: dot-product MF with user, item and global biases trained with the
    logistic loss over sampled negatives, the recipe of Rendle, Krichene, Zhang, Anderson 2020
    ("Neural Collaborative Filtering vs. Matrix Factorization Revisited"). Their ML-1M run:
    8 negatives, L2 0.005 per training example, init std 0.1, 256 epochs of plain per-example
    SGD (lr 0.002), dimension 16..192 (larger is better). Here minibatch training through the
    shared trainer; the dimension is picked on the validation set."""

    dims: list[int] = Field(default_factory=lambda: [64, 128], min_length=1,
                            description="embedding dimensions searched on the validation set "
                                        "(the first when there is none)")
    negatives: int = Field(8, ge=1, description="sampled negatives per positive")
    epochs: int = Field(60, ge=1, description="the most epochs (early stopping on validation)")
    batch_size: int = Field(8192, ge=1, description="training pairs (positives + negatives) "
                                                    "per step")
    optimizer: Literal["adam", "adagrad", "sgd"] = "adam"
    lr: float = Field(0.002, gt=0)
    lr_decay: float = Field(1.0, gt=0, le=1, description="learning rate × this every epoch")
    l2: float = Field(0.005, ge=0, description="L2 on the embeddings and biases of each "
                                               "training pair (Rendle et al.'s `reg`)")
    init_std: float = Field(0.1, gt=0, description="embeddings start N(0, init_std²); "
                                                   "biases at 0")
    patience: int = Field(5, ge=1)
    refit: Refit = Field(True, description="with the chosen dimension and epochs, retrain on "
                                          "train + valid")

    @field_validator("dims")
    @classmethod
    def _positive(cls, dims: list[int]) -> list[int]:
        if any(d < 1 for d in dims):
            raise ValueError(f"every dimension must be >= 1, got {dims}")
        return dims

    def as_train(self, metric: str) -> TrainConfig:
        """This schedule as the trainer's config (logistic loss, early-stopping on `metric`):
        every field is set here, none taken from TrainConfig's defaults."""
        return TrainConfig(loss="bce", metric=metric, weight_decay=0.0, embedding_reg=self.l2,
                           **self.model_dump(exclude={"dims", "l2", "init_std"}))


class EncodersConfig(Section):
    source: Literal["pretrained", "basic"] = Field(
        "pretrained", description="pretrained (transformer + vision model) | basic "
                                  "(weight-free featurizers)")
    store_url: str | None = Field(None, description="metadata store URL (embedding cache); "
                                                    "null = SQLite in the state dir")
    text_model: str = Field("default", description="default = offline MiniLM; or a hub name "
                                                   "(roberta-base) / a local folder")
    text_max_length: int = Field(128, ge=8)
    text_fields: list[str] = Field(
        default_factory=lambda: ["title", "genres", "overview", "keywords"], min_length=1)
    text_separator: str = " | "
    image_model: str = Field("efficientnet_lite0", description="a timm name, e.g. "
                                                               "vit_base_patch16_224")
    image_weights: str = Field("default", description="default (packaged, lite0 only) | hub | "
                                                      "a checkpoint file")
    device: str = Field("auto", description="auto = CUDA when present, else CPU")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="auto = fp16 on CUDA, bf16 on a CPU with native bf16, else fp32")
    batch_size: int | None = Field(None, ge=1, description="null = per-device default")
    image_workers: int | None = Field(None, ge=0, description="null = per-device default")
    write_chunk: int = Field(256, ge=1, description="vectors per cache transaction")


class PipelineConfig(Section):
    candidates: list[str] = Field(default_factory=lambda: ["id", "text+image"], min_length=1,
                                  description="BoNMF variants; the best one is the candidate")
    baselines: list[str] = Field(default_factory=lambda: ["pop", "bpr"],
                                 description="the candidate must beat these")
    executor: Literal["in_process", "multiprocess", "dask", "celery", "k8s"] = Field(
        "in_process", description="the Dagster executor of `bonmf run` and of launches from "
                                  "the UI (docs/executors.md); dask, celery and k8s need "
                                  "dagster-dask, dagster-celery, dagster-k8s")
    executor_config: dict[str, Any] = Field(
        default_factory=dict, description="that executor's own config (Dagster's "
                                          "`execution.config`), checked against its schema "
                                          "when a run starts; empty = its defaults")

    @field_validator("candidates")
    @classmethod
    def _bonmf_only(cls, names: list[str]) -> list[str]:
        wrong = [v for v in names if v not in BONMF_VARIANTS]
        if wrong:
            raise ValueError(f"{wrong} are not BoNMF variants ({', '.join(BONMF_VARIANTS)})")
        return names

    @field_validator("baselines")
    @classmethod
    def _baselines_only(cls, names: list[str]) -> list[str]:
        wrong = [v for v in names if v not in BASELINE_VARIANTS]
        if wrong:
            raise ValueError(f"{wrong} are not baselines ({', '.join(BASELINE_VARIANTS)})")
        return names


class ChecksConfig(Section):
    """The data checks' thresholds (data_checks.CheckThresholds) and the Data Docs switch."""

    rating_scale: tuple[float, float] | None = Field(None, description="[low, high]; null = "
                                                                       "the scale the source "
                                                                       "declares")
    min_interactions_per_user: int = Field(1, ge=0)
    timestamp_min: int = Field(788918400, description="1995-01-01 UTC: older is a unit "
                                                      "or parsing mistake")
    timestamp_max_slack_days: float = Field(1.0, ge=0)
    text_coverage_min: float = Field(0.5, ge=0, le=1)
    readable_image_min: float = Field(0.9, ge=0, le=1)
    max_rating_mean_shift: float = Field(0.25, ge=0)
    max_new_item_share: float = Field(0.2, ge=0, le=1)
    max_new_user_share: float = Field(0.2, ge=0, le=1)
    max_volume_change: float = Field(0.5, ge=0)
    max_malformed_lines: int = Field(0, ge=0, description="lines that do not parse (wrong "
                                                          "field count, bad encoding) tolerated "
                                                          "before the parsing check blocks")
    data_docs: bool = Field(False, description="build a GX Data Docs site under the state dir")

    @field_validator("rating_scale")
    @classmethod
    def _scale(cls, scale: tuple[float, float] | None) -> tuple[float, float] | None:
        if scale is not None and not scale[0] < scale[1]:
            raise ValueError(f"rating_scale must be [low, high] with low < high, got {scale}")
        return scale


class PromotionConfig(Section):
    primary_metric: Metric = Field("ndcg@10", pattern=METRIC_PATTERN)
    min_improvement: float = Field(0.001, ge=0, description="absolute margin over the "
                                                            "production model")
    floors: dict[str, float] = Field(default_factory=lambda: {"hr@10": 0.2, "ndcg@10": 0.1})
    beat_baselines: bool = True

    @field_validator("floors")
    @classmethod
    def _metric_names(cls, floors: dict[str, float]) -> dict[str, float]:
        wrong = [k for k in floors if not re.match(METRIC_PATTERN, k)]
        if wrong:
            raise ValueError(f"floors {wrong} are not metrics like ndcg@10")
        return floors


class RetrainConfig(Section):
    cron: str = Field("0 3 * * 1", description="weekly, Monday 03:00")
    timezone: str = "UTC"
    sensor_interval_s: int = Field(300, ge=10, description="how often the new-data sensor "
                                                           "looks at the source")


class ServingConfig(Section):
    """The service's limits and deployment defaults; recorded in the serving bundle, so a
    Bento serves with the section it was packaged with."""

    bento_name: str = Field("bonmf", pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    max_k: int = Field(1000, ge=1, description="largest k a request may ask for")
    max_liked_items: int = Field(1000, ge=1, description="recommend_for_items: ids per "
                                                         "request")
    max_text_chars: int = Field(20000, ge=1, description="score_new_item: title + text")
    max_image_bytes: int = Field(10485760, ge=1, description="score_new_item: image upload")
    max_image_pixels: int = Field(
        25_000_000, ge=1,
        description="score_new_item: an image whose width × height exceeds this is refused "
                    "(413) from its header, before any pixel is decoded (Pillow's own "
                    "decompression-bomb limit, ~179 M pixels, refuses the same way)")
    api_key_file: str | None = Field(
        None, description="file holding the API key every endpoint but /readyz and /livez "
                          "then requires (Authorization: Bearer <key>); $BONMF_API_KEY "
                          "wins over it; null and no $BONMF_API_KEY = no authentication")
    host: str = Field("127.0.0.1", description="interface the Bento binds unless "
                                               "`bentoml serve --host` names one; another "
                                               "than loopback without a key is warned about")
    ann_min_items: int = Field(
        100_000, ge=1, description="catalogs with at least this many items answer recommend "
        "and similar_items in two stages (an approximate nearest-neighbour index proposes "
        "candidates, the full head re-ranks them: docs/retrieval.md); smaller ones score "
        "every item")
    ann_candidates: int = Field(500, ge=1, description="candidates the index proposes per "
                                                       "request (plus the user's seen items)")
    ann_nprobe: int = Field(64, ge=1, description="IVF lists each query visits: recall "
                                                  "against latency")
    ann_lists: int = Field(0, ge=0, description="IVF lists (k-means cells); 0 = 4·√items")

    @field_validator("host")
    @classmethod
    def _ip_address(cls, host: str) -> str:
        import ipaddress

        try:  # BentoML binds IP addresses only (no host names)
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"host must be an IP address such as 127.0.0.1, got "
                             f"{host!r}") from None
        return host


class DvcConfig(Section):
    remote: str | None = Field(None, description="null = $BONMF_DVC_REMOTE or "
                                                 "<state dir>/dvc-remote; or s3://…, ssh://…")
    endpoint_url: str | None = Field(
        None, description="an s3:// remote's S3-compatible endpoint (MinIO, SeaweedFS, Ceph: "
        "http://host:port); null = $BONMF_DVC_ENDPOINT_URL, else AWS. Credentials never "
        "go here: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment")
    remote_name: str = "storage"
    push_after_promotion: bool = Field(True, description="track, push and commit each "
                                                         "promoted version")
    repo: str | None = Field(None, description="null = the git repo holding the state folder")
    git_commit: bool = Field(True, description="commit the pointer files (promoted/*.dvc)")
    git_branch: str | None = Field(
        "bonmf/registry", description="branch the pointer-file commits go to, written with "
        "git plumbing: your current branch, index and working tree are left alone; it starts "
        "at the commit checked out at the first promotion. null = commit on the current "
        "branch (what bonmf did before)")
    git_tag: str | None = Field(
        "model@v{version}", pattern=r"\{version\}",
        description="annotated tag on each version's commit; {version} is the registry id "
                    "(`bonmf restore --rev model@v3`); null = no tags")
    lock_timeout_s: float = Field(600.0, gt=0, description="wait this long for another DVC "
                                                           "operation")


class BonmfConfig(Section):
    """Every section; `params.yaml` mirrors this layout."""

    data: DataConfig = Field(default_factory=DataConfig)
    protocol: ProtocolConfig = Field(default_factory=ProtocolConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    encoders: EncodersConfig = Field(default_factory=EncodersConfig)
    bpr: BprConfig = Field(default_factory=BprConfig)
    ease: EaseConfig = Field(default_factory=EaseConfig)
    item_knn: ItemKnnConfig = Field(default_factory=ItemKnnConfig)
    mf: MfConfig = Field(default_factory=MfConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    checks: ChecksConfig = Field(default_factory=ChecksConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    dvc: DvcConfig = Field(default_factory=DvcConfig)

    def dump(self) -> dict:
        """Plain JSON-able values (what the registry, fit keys and reports record)."""
        return self.model_dump(mode="json")


# -- loading ----------------------------------------------------------------------------------

def default_params_file() -> Path | None:
    """`$BONMF_PARAMS`, else ./params.yaml when it exists, else None (the defaults alone)."""
    env = os.environ.get("BONMF_PARAMS")
    if env:
        return Path(env)
    local = Path(PARAMS_FILE)
    return local if local.is_file() else None


def parse_set(assignments) -> dict:
    """`["train.lr=0.01", "pipeline.candidates=[id]"]` → a nested override mapping. Values are
    YAML (`3`, `0.5`, `null`, `true`, `[id, text]`); keys are checked by the schema."""
    import yaml

    out: dict = {}
    for text in assignments or ():
        key, sep, raw = str(text).partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set {text!r}: expected section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {text!r}: the value is not valid YAML ({exc})") from None
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {part} is set to a value and a section")
        node[parts[-1]] = value
    return out


def merge(base: dict, override: dict) -> dict:
    """`override` deep-merged over `base` (new dicts; mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_params_file(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such params file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got "
                          f"{type(loaded).__name__}")
    return loaded


def validate(values: dict, where: dict[str, str] | None = None) -> BonmfConfig:
    """`values` (nested sections) → BonmfConfig; errors name the key path and where it was
    set (`where`: key path → 'params.yaml', '--set', '--epochs', …)."""
    try:
        return BonmfConfig.model_validate(values)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            path = ".".join(str(p) for p in error["loc"])
            origin = _origin(path, where or {})
            if error["type"] == "extra_forbidden":
                section = _known(error["loc"][:-1])
                message = f"unknown key (known: {', '.join(section)})" if section else \
                    "unknown key"
            else:
                message = error["msg"]
            lines.append(f"{origin}{path}: {message}")
        raise ConfigError("; ".join(lines)) from None


def _known(loc) -> list[str]:
    model: Any = BonmfConfig
    for part in loc:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) \
                or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def _origin(path: str, where: dict[str, str]) -> str:
    best = ""
    for key, origin in where.items():
        if (path == key or path.startswith(key + ".")) and len(key) > len(best):
            best = key
    return f"{where[best]}: " if best else ""


def _paths(values: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        out.append(path)
        if isinstance(value, dict):
            out.extend(_paths(value, path + "."))
    return out


def load_config(params: str | Path | None = None, sets=(), flags: dict | None = None,
                *, use_default_file: bool = True) -> BonmfConfig:
    """defaults < the params file < `sets` (`section.key=value` strings) < `flags` (nested
    overrides from explicit command-line options, e.g. {"train": {"epochs": 3}}).

    `params`: the file; None = `default_params_file()` (unless `use_default_file` is off).
    """
    path = Path(params) if params else (default_params_file() if use_default_file else None)
    values: dict = {}
    where: dict[str, str] = {}
    layers = [(read_params_file(path), str(path))] if path else []
    layers += [(parse_set(sets), "--set"), (flags or {}, "command line")]
    for layer, origin in layers:
        values = merge(values, layer)
        where.update({p: origin for p in _paths(layer)})
    return validate(values, where)


def config_file_of(params: str | Path | None = None) -> str | None:
    """The params file `load_config(params)` reads, as a string (None when none)."""
    path = Path(params) if params else default_params_file()
    return str(path) if path else None


def add_config_arguments(parser) -> None:
    """`--params FILE` and repeatable `--set section.key=value` on an argparse parser: the
    options every command and benchmark reads the configuration with (`load_config(args.params,
    args.set, flags)`)."""
    parser.add_argument("--params", default=None,
                        help="params file (default: $BONMF_PARAMS, else ./params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one parameter (YAML value; repeatable), e.g. "
                             "--set train.lr=0.01 --set pipeline.candidates=[id]")
