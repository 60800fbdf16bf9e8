"""Fréchet Inception Distance: the FID InceptionV3 in Flax, its weights, and the statistics.

Typical use::

    from ddpm_jax import fid

    weights, reason = fid.try_load_inception_weights(
        config.eval.inception_weights, config.eval.inception_sha256)
    if weights is None:
        logging.info("FID skipped: %s", reason)
    else:
        features_fn = fid.make_feature_fn(weights.variables)  # images in [-1, 1] -> [B, 2048]
        stats = fid.init_feature_stats(fid.FEATURE_DIM)
        for images in batches:
            stats = fid.update_feature_stats(stats, features_fn(images))
        mu, sigma = fid.mean_and_covariance(stats)
        score = fid.frechet_distance(mu, sigma, *fid.load_stats(reference_path))

The rest of guided-diffusion's evaluator (ADM) from the same network, in one forward pass::

    ref = fid.load_reference("VIRTUAL_imagenet256_labeled.npz")  # ADM batch or EDM stats
    features_fn = fid.make_features_fn(
        weights.variables, fid.require_logits_kernel(weights))  # -> {"pool", "logits", "spatial"}
    # per batch: stream "pool" and "spatial" (2,023-d) into FeatureStats, keep the "pool" and
    # "logits" rows of every sample (and the reference's pool rows); then
    is_mean, is_std = fid.inception_score(logits, splits=10)  # 5,000 per split at 50k
    sfid = fid.frechet_distance(mu_s, sigma_s, ref.mu_s, ref.sigma_s)
    precision, recall = fid.precision_recall(real_pool, fake_pool, k=3)
"""

from ddpm_jax.fid.download import PYTORCH_FID_WEIGHTS_URL, verify_sha256
from ddpm_jax.fid.frechet import (
    FeatureStats,
    frechet_distance,
    init_feature_stats,
    load_stats,
    mean_and_covariance,
    merge_feature_stats,
    reference_stats_path,
    save_stats,
    update_feature_stats,
)
from ddpm_jax.fid.inception import (
    FEATURE_DIM,
    FEATURE_OUTPUTS,
    INCEPTION_SIZE,
    LOGITS_DIM,
    MIN_INPUT_SIZE,
    SPATIAL_BLOCK,
    SPATIAL_DIM,
    FIDInceptionV3,
    images_from_uint8,
    make_feature_fn,
    make_features_fn,
    variable_shapes,
)
from ddpm_jax.fid.metrics import inception_score, knn_radii, precision_recall
from ddpm_jax.fid.reference import ReferenceFile, iter_reference_images, load_reference
from ddpm_jax.fid.weights import (
    InceptionWeights,
    convert_state_dict,
    convert_torch_checkpoint,
    has_logits_layer,
    load_inception_weights,
    load_variables_npz,
    load_weights_npz,
    require_logits_kernel,
    save_variables_npz,
    try_load_inception_weights,
)

__all__ = [
    "FEATURE_DIM",
    "FEATURE_OUTPUTS",
    "INCEPTION_SIZE",
    "LOGITS_DIM",
    "MIN_INPUT_SIZE",
    "PYTORCH_FID_WEIGHTS_URL",
    "SPATIAL_BLOCK",
    "SPATIAL_DIM",
    "FIDInceptionV3",
    "FeatureStats",
    "InceptionWeights",
    "ReferenceFile",
    "convert_state_dict",
    "convert_torch_checkpoint",
    "frechet_distance",
    "has_logits_layer",
    "images_from_uint8",
    "inception_score",
    "init_feature_stats",
    "iter_reference_images",
    "knn_radii",
    "load_inception_weights",
    "load_reference",
    "load_stats",
    "load_variables_npz",
    "load_weights_npz",
    "make_feature_fn",
    "make_features_fn",
    "mean_and_covariance",
    "merge_feature_stats",
    "precision_recall",
    "reference_stats_path",
    "require_logits_kernel",
    "save_stats",
    "save_variables_npz",
    "try_load_inception_weights",
    "update_feature_stats",
    "variable_shapes",
    "verify_sha256",
]
