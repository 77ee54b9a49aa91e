"""Evaluation: Frechet distance, KID, FD-infinity and precision/recall in the features of a chosen network against
a fixed real reference, beside the real-vs-real floor of the same class composition, each with its spread; class
coverage under the feature network; likelihood in bits/dim (variational bound and probability-flow ODE).

Features: ``"feature_net"`` (the project's own feature network of the data set, MNIST or Fashion-MNIST,
penultimate layer; works offline, see :mod:`.features`) or ``"inception"`` (the standard FID InceptionV3 pool3,
needs the user-supplied weights file, see :mod:`.inception`). The reference is the data set's whole test split (or
n_ref fixed images of it); the floor is the mean and spread over several draws of real training images with the
samples' class counts (random draws for unconditional samples). The rule in full: :mod:`.quality`.
"""
from __future__ import annotations

from .features import (FEATURE_DATASETS, FEATURES, FeatureNet, classify, extract_features, feature_net_metadata,
                       feature_net_path, load_feature_net, split_features, train_feature_net)
from .metrics import (FrechetReference, KernelReference, fd_infinity, frechet_distance, kernel_inception_distance,
                      precision_recall)
from .quality import (EVAL_DATASETS, eval_dataset, evaluate_samples, floor_draws, periodic_evaluation, real_features,
                      real_floor, real_images, reference_set)

__all__ = ["periodic_evaluation", "evaluate_samples", "real_features", "real_images", "extract_features", "classify",
           "frechet_distance", "kernel_inception_distance", "precision_recall", "fd_infinity", "FrechetReference",
           "KernelReference", "FeatureNet", "train_feature_net", "load_feature_net", "feature_net_path",
           "feature_net_metadata", "split_features", "reference_set", "real_floor", "floor_draws", "eval_dataset",
           "EVAL_DATASETS", "FEATURE_DATASETS", "FEATURES"]
