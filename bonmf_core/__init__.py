"""BoNMF core library: data, splits, the BoNMF model, training and evaluation."""
