"""The FID InceptionV3 network in flax.linen (NHWC), returning 2048-d pool3 features.

This is the network of the TensorFlow FID reference (the 2015-12-05 Inception graph) in the
form pytorch-fid ships it (`pt_inception-2015-12-05-6726825d.pth`): torchvision's Inception3
trunk with the graph's quirks,

* Mixed_5b..5d, Mixed_6b..6e and Mixed_7b average-pool their pool branch WITHOUT counting the
  zero padding (TensorFlow's average pool), where torchvision counts it;
* Mixed_7c max-pools its pool branch (3x3, stride 1, padding 1) instead of average-pooling;
* every convolution has no bias and is followed by BatchNorm (eps 1e-3, running statistics)
  and ReLU.

Module and parameter names mirror the PyTorch state dict (`Mixed_5b/branch1x1/conv/kernel` is
`Mixed_5b.branch1x1.conv.weight`), so the weight converter is a rename plus a transpose.

Three outputs serve the metrics of guided-diffusion's evaluator (Dhariwal & Nichol 2021, ADM),
all from one forward pass (`make_features_fn`):

* "pool": the 2048 pool3 features (TF `pool_3:0`): FID, precision and recall.
* "logits": the 1008 logits as ADM's evaluator takes them for the Inception Score: pool3 times
  the kernel of TF's `softmax/logits/MatMul` (`softmax/weights`), WITHOUT the bias
  `softmax/biases`. pytorch-fid's `fc` layer is that pair (`fc.weight` = `softmax/weights`
  transposed, `fc.bias` = `softmax/biases`); the matmul is done outside the module, so the
  network and its variables are those of FID alone.
* "spatial": ADM's sFID features, TF's `mixed_6/conv:0` (the output, after batch norm and
  ReLU, of the 1x1 branch of the seventh mixed block), first 7 channels, flattened in
  (row, column, channel) order: 17x17x7 = 2023 values at 299x299. The TF graph names its
  mixed blocks `mixed`, `mixed_1`, ..., `mixed_10`, which are torchvision's Mixed_5b, 5c, 5d,
  6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c in order, and a block's `conv` is its `branch1x1`:
  `mixed_6/conv` is Mixed_6d.branch1x1 (pytorch-fid's weights map `mixed_6/conv/conv2d_params`
  to `Mixed_6d.branch1x1.conv.weight`). Mixed_6d concatenates branch1x1 first, so its first 7
  output channels are these.

Inputs follow the project's convention, float images in [-1, 1]; they are resized bilinearly
(half-pixel centres, no antialiasing: `F.interpolate(..., mode="bilinear",
align_corners=False)` as in pytorch-fid) to 299x299. For numbers comparable with published FIDs,
quantize images to uint8 first, exactly as they would be saved (see `images_from_uint8`).
"""

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

INCEPTION_SIZE = 299  # input side the weights were trained at.
MIN_INPUT_SIZE = 75  # smallest side for which every VALID conv/pool still has an output.
FEATURE_DIM = 2048
LOGITS_DIM = 1008
SPATIAL_BLOCK = "Mixed_6d"  # TF's `mixed_6`; its branch1x1 is `mixed_6/conv`.
SPATIAL_CHANNELS = 7
SPATIAL_SIZE = 17  # side of the Mixed_6* grid at 299x299.
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023
FEATURE_OUTPUTS = ("pool", "logits", "spatial")
BN_EPSILON = 1e-3

Variables = Mapping[str, Any]  # {"params": ..., "batch_stats": ...}


def images_from_uint8(images: np.ndarray | jax.Array) -> jax.Array:
    """Maps uint8 images [B, H, W, 3] in {0..255} to float32 in [-1, 1] (x / 127.5 - 1)."""
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def resize_bilinear(images: jax.Array, size: int) -> jax.Array:
    """Bilinear resize of [B, H, W, C] to [B, size, size, C], as PyTorch's `F.interpolate`.

    Half-pixel centres and no antialiasing filter, also when downsampling: this equals
    `torch.nn.functional.interpolate(x, (size, size), mode="bilinear", align_corners=False)`.
    """
    b, _, _, c = images.shape
    return jax.image.resize(images, (b, size, size, c), method="bilinear", antialias=False)


def avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
    """3x3/stride-1 average pool, padding 1, dividing by the number of in-image pixels."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def max_pool_3x3_same(x: jax.Array) -> jax.Array:
    """3x3/stride-1 max pool, padding 1 (the padding never wins: it is -inf)."""
    return nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))


def max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    """3x3/stride-2 max pool without padding (floor), as `nn.MaxPool2d(3, stride=2)`."""
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU.

    Attributes:
        features: output channels.
        kernel_size: (kh, kw).
        strides: (sh, sw).
        padding: symmetric zero padding (ph, pw), as PyTorch's `padding=`.
        precision: matmul precision of the convolution.
    """

    features: int
    kernel_size: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=tuple((p, p) for p in self.padding),
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
        return nn.relu(x)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b..5d): 1x1, 5x5, double 3x3 and pool branches."""

    pool_features: int
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(64, name="branch1x1")(x)
        b5 = conv(48, name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, name="branch_pool")(avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a)."""

    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        bd = conv(64, name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b..6e) with factorized 7x7 convolutions."""

    channels_7x7: int
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        c7 = self.channels_7x7
        row, col = (
            dict(kernel_size=(1, 7), padding=(0, 3)),
            dict(kernel_size=(7, 1), padding=(3, 0)),
        )
        b1 = conv(192, name="branch1x1")(x)
        b7 = conv(c7, name="branch7x7_1")(x)
        b7 = conv(c7, **row, name="branch7x7_2")(b7)
        b7 = conv(192, **col, name="branch7x7_3")(b7)
        bd = conv(c7, name="branch7x7dbl_1")(x)
        bd = conv(c7, **col, name="branch7x7dbl_2")(bd)
        bd = conv(c7, **row, name="branch7x7dbl_3")(bd)
        bd = conv(c7, **col, name="branch7x7dbl_4")(bd)
        bd = conv(192, **row, name="branch7x7dbl_5")(bd)
        bp = conv(192, name="branch_pool")(avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a)."""

    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(192, name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
        b7 = conv(192, name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b with `pool="avg"`, Mixed_7c with `pool="max"`: the graph's quirk)."""

    pool: str = "avg"
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        row, col = (
            dict(kernel_size=(1, 3), padding=(0, 1)),
            dict(kernel_size=(3, 1), padding=(1, 0)),
        )
        b1 = conv(320, name="branch1x1")(x)
        b3 = conv(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [conv(384, **row, name="branch3x3_2a")(b3), conv(384, **col, name="branch3x3_2b")(b3)],
            axis=-1,
        )
        bd = conv(448, name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                conv(384, **row, name="branch3x3dbl_3a")(bd),
                conv(384, **col, name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.pool == "avg":
            pooled = avg_pool_3x3_exclude_pad(x)
        elif self.pool == "max":
            pooled = max_pool_3x3_same(x)
        else:
            raise ValueError(f"InceptionE.pool must be 'avg' or 'max', got {self.pool!r}.")
        bp = conv(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """FID InceptionV3 up to the final average pool (pool3).

    Attributes:
        resize_input: resize inputs to 299x299 first (on for real FID; tests switch it off and
            feed small images, at least 75x75).
        precision: convolution precision; "highest" keeps float32 accuracy on TPUs/TF32 GPUs,
            whose default would change the features and hence the FID.
    """

    resize_input: bool = True
    precision: Any = "highest"

    @nn.compact
    def __call__(
        self, images: jax.Array, spatial: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Computes pool3 features (and, on request, the sFID spatial features).

        Args:
            images: float [B, H, W, 3] in [-1, 1].
            spatial: also return ADM's spatial features (see the module docstring).

        Returns:
            float32 [B, 2048] features; with `spatial`, also float32 [B, 17, 17, 7] (at 299x299;
            smaller without `resize_input` on small inputs): the first 7 channels of Mixed_6d,
            which are its branch1x1's.
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"FIDInceptionV3 expects images [B, H, W, 3], got shape {images.shape}."
            )
        x = images.astype(jnp.float32)
        if self.resize_input:
            x = resize_bilinear(x, INCEPTION_SIZE)
        elif min(x.shape[1:3]) < MIN_INPUT_SIZE:
            raise ValueError(
                f"images are {x.shape[1]}x{x.shape[2]}; without resize_input the network needs "
                f"at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}."
            )
        p = self.precision
        x = BasicConv2d(32, (3, 3), strides=(2, 2), precision=p, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), precision=p, name="Conv2d_2b_3x3")(x)
        x = max_pool_3x3_stride2(x)
        x = BasicConv2d(80, (1, 1), precision=p, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)
        x = max_pool_3x3_stride2(x)
        x = InceptionA(32, precision=p, name="Mixed_5b")(x)
        x = InceptionA(64, precision=p, name="Mixed_5c")(x)
        x = InceptionA(64, precision=p, name="Mixed_5d")(x)
        x = InceptionB(precision=p, name="Mixed_6a")(x)
        x = InceptionC(128, precision=p, name="Mixed_6b")(x)
        x = InceptionC(160, precision=p, name="Mixed_6c")(x)
        x = InceptionC(160, precision=p, name=SPATIAL_BLOCK)(x)
        mixed_6_conv = x[..., :SPATIAL_CHANNELS]  # branch1x1 is concatenated first
        x = InceptionC(192, precision=p, name="Mixed_6e")(x)
        x = InceptionD(precision=p, name="Mixed_7a")(x)
        x = InceptionE("avg", precision=p, name="Mixed_7b")(x)
        x = InceptionE("max", precision=p, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        return (pool, mixed_6_conv) if spatial else pool


def variable_shapes() -> dict[str, tuple[int, ...]]:
    """Shapes of every variable, keyed "params/Mixed_5b/branch1x1/conv/kernel" etc.

    Computed abstractly (no FLOPs; shapes do not depend on the input size) and memoised, as
    tracing the network takes about a second.
    """
    return dict(_variable_shapes())


@functools.cache
def _variable_shapes() -> tuple[tuple[str, tuple[int, ...]], ...]:
    model = FIDInceptionV3(resize_input=False)
    dummy = jax.ShapeDtypeStruct((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), dummy)
    flat = traverse_util.flatten_dict(abstract, sep="/")
    return tuple(sorted((k, tuple(v.shape)) for k, v in flat.items()))


def random_variables(seed: int) -> dict[str, Any]:
    """Random but well-scaled variables (He-normal kernels, random BN statistics), for tests.

    Drawn with numpy (one vectorised draw per array; per-array `jax.random` calls would each
    compile) so that building 470 arrays takes milliseconds.

    Args:
        seed: seed of a `numpy.random.Generator`.

    Returns:
        {"params": ..., "batch_stats": ...} of float32 numpy arrays, shaped as
        `variable_shapes()`.
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in sorted(variable_shapes().items()):
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif leaf in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            value = 0.1 * rng.standard_normal(shape)
        flat[name] = value.astype(np.float32)
    return traverse_util.unflatten_dict(flat, sep="/")


def make_feature_fn(
    variables: Variables, *, resize_input: bool = True
) -> Callable[[jax.Array], jax.Array]:
    """Returns a jitted `features(images [B, H, W, 3] in [-1, 1]) -> float32 [B, 2048]`.

    The variables are passed to the jitted function as an argument (not baked in as
    constants), so the compiled program stays small and one compilation serves every batch of
    the same shape. Sharded image batches keep their sharding.
    """
    model = FIDInceptionV3(resize_input=resize_input)
    apply = jax.jit(model.apply)
    return lambda images: apply(variables, images)


def make_features_fn(
    variables: Variables,
    logits_kernel: np.ndarray | jax.Array | None = None,
    *,
    outputs: tuple[str, ...] = FEATURE_OUTPUTS,
    resize_input: bool = True,
) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """Returns a jitted `features(images [B, H, W, 3] in [-1, 1]) -> {name: float32 [B, D]}`.

    One forward pass gives every requested output (see the module docstring):
    "pool" [B, 2048], "logits" [B, 1008] = pool @ logits_kernel (no bias, as ADM), and
    "spatial" [B, 2023] (at 299x299), the Mixed_6d branch1x1 channels 0..6 flattened in
    (row, column, channel) order as ADM flattens TF's NHWC tensor. Variables and kernel are
    arguments of the jitted function, not constants, as in `make_feature_fn`.

    Args:
        variables: the network's {"params", "batch_stats"}.
        logits_kernel: float32 [2048, 1008], needed for "logits" (`InceptionWeights.logits_kernel`;
            `weights.require_logits_kernel` explains a file that lacks it).
        outputs: which of "pool", "logits", "spatial" to return.
        resize_input: as `FIDInceptionV3`.

    Raises:
        ValueError: an unknown or empty `outputs`, or "logits" without a kernel of the right
            shape.
    """
    outputs = tuple(outputs)
    unknown = [o for o in outputs if o not in FEATURE_OUTPUTS]
    if unknown or not outputs:
        raise ValueError(f"outputs must be a non-empty subset of {FEATURE_OUTPUTS}, got {outputs}.")
    if "logits" in outputs:
        if logits_kernel is None:
            raise ValueError("the 'logits' output needs logits_kernel (pytorch-fid's fc weights).")
        if tuple(np.shape(logits_kernel)) != (FEATURE_DIM, LOGITS_DIM):
            shape = np.shape(logits_kernel)
            raise ValueError(f"logits_kernel must be [{FEATURE_DIM}, {LOGITS_DIM}], got {shape}.")
    else:
        logits_kernel = None
    model = FIDInceptionV3(resize_input=resize_input)
    want_spatial = "spatial" in outputs

    def forward(variables, kernel, images):
        out = model.apply(variables, images, spatial=want_spatial)
        pool, spatial = out if want_spatial else (out, None)
        result = {}
        if "pool" in outputs:
            result["pool"] = pool
        if kernel is not None:
            result["logits"] = jnp.dot(pool, kernel, precision=jax.lax.Precision.HIGHEST)
        if want_spatial:
            result["spatial"] = spatial.reshape(spatial.shape[0], -1)
        return result

    apply = jax.jit(forward)
    return lambda images: apply(variables, logits_kernel, images)
