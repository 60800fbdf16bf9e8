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
"""

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
    INCEPTION_SIZE,
    MIN_INPUT_SIZE,
    FIDInceptionV3,
    images_from_uint8,
    make_feature_fn,
    variable_shapes,
)
from ddpm_jax.fid.weights import (
    PYTORCH_FID_WEIGHTS_URL,
    InceptionWeights,
    convert_state_dict,
    convert_torch_checkpoint,
    load_inception_weights,
    load_variables_npz,
    save_variables_npz,
    try_load_inception_weights,
    verify_sha256,
)

__all__ = [
    "FEATURE_DIM",
    "INCEPTION_SIZE",
    "MIN_INPUT_SIZE",
    "PYTORCH_FID_WEIGHTS_URL",
    "FIDInceptionV3",
    "FeatureStats",
    "InceptionWeights",
    "convert_state_dict",
    "convert_torch_checkpoint",
    "frechet_distance",
    "images_from_uint8",
    "init_feature_stats",
    "load_inception_weights",
    "load_stats",
    "load_variables_npz",
    "make_feature_fn",
    "mean_and_covariance",
    "merge_feature_stats",
    "reference_stats_path",
    "save_stats",
    "save_variables_npz",
    "try_load_inception_weights",
    "update_feature_stats",
    "variable_shapes",
    "verify_sha256",
]
