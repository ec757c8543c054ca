"""Operations: the pipeline's step functions, the model registry, the promotion gate and
DVC versioning."""
