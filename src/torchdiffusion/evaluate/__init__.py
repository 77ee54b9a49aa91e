"""Evaluation: Frechet distance, KID and precision/recall in the features of a chosen network, class coverage
under the feature network, and likelihood in bits/dim (variational bound and probability-flow ODE).

Features: ``"feature_net"`` (the project's own MNIST feature network, penultimate layer; works offline, see
:mod:`.features`) or ``"inception"`` (the standard FID InceptionV3 pool3, needs the user-supplied weights file,
see :mod:`.inception`). Reference images come from the MNIST *test* split, permuted once by ``seed``: the first
``n_real`` are the reference set R1 the samples are compared with, the next ``n_real`` a second, disjoint real set
R2; the floor (fd_floor, kid_floor, precision_floor, recall_floor) compares R2 with R1, i.e. what a perfect
generator of ``n_real`` samples would score. ``n_real`` defaults to the number of samples (at most 5000).
"""
from __future__ import annotations

from .features import (FeatureNet, feature_net_metadata, feature_net_path, load_feature_net,
                       train_feature_net)
from .metrics import frechet_distance, kernel_inception_distance, precision_recall
from .quality import (FEATURES, classify, evaluate_samples, extract_features, periodic_evaluation, real_features,
                      real_images)

__all__ = ["periodic_evaluation", "evaluate_samples", "real_features", "real_images", "extract_features", "classify",
           "frechet_distance", "kernel_inception_distance", "precision_recall", "FeatureNet", "train_feature_net",
           "load_feature_net", "feature_net_path", "feature_net_metadata", "FEATURES"]
