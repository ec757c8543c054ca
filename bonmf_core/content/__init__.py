"""Item content: pretrained encoders, catalog encoding through the embedding cache, the item
text composer and the weight-free featurizers."""
