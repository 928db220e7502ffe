"""Deterministic MiDaS weights from a formula, reproduced bit for bit by `midas-model/src/weights/synthetic.rs`.

Every value comes from a SplitMix64 stream seeded by the FNV-1a hash of the tensor's upstream key,
turned into an f32 in [-1, 1) with 24 exact bits, then scaled with float32 arithmetic that Rust
performs identically (IEEE-754, no fused multiply-add). Scales keep activations in a sane range
through the whole network so that a parity test compares real signal, not zeros.

MiDaS v2.1 small uses `state_dict` (roles told apart by BatchNorm running stats); DPT-Hybrid, which
has no BatchNorm, uses `dpt_state_dict` (roles told apart by key name and rank, see `dpt_kind_of`).
"""

import math

import numpy as np

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
GOLDEN = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1


def fnv1a64(text):
    h = FNV_OFFSET
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * FNV_PRIME) & MASK
    return h


def uniform(name, count):
    """`count` float32 values in [-1, 1) for stream `name`."""
    with np.errstate(over="ignore"):
        index = np.arange(1, count + 1, dtype=np.uint64)
        x = np.uint64(fnv1a64(name)) + index * np.uint64(GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    top24 = (x >> np.uint64(40)).astype(np.float32)
    return top24 * np.float32(2.0**-23) - np.float32(1.0)


def tensor(name, shape, kind):
    """One synthetic tensor; `kind` is the role the upstream key plays (see `kind_of`)."""
    count = int(np.prod(shape)) if shape else 1
    u = uniform(name, count)
    if kind == "conv_weight":
        fan_in = int(np.prod(shape[1:]))
        value = u * np.float32(math.sqrt(3.0 / fan_in))
    elif kind == "conv_bias":
        value = u * np.float32(0.05)
    elif kind == "bn_weight":
        value = np.float32(1.0) + u * np.float32(0.1)
    elif kind == "bn_bias":
        value = u * np.float32(0.1)
    elif kind == "bn_running_mean":
        value = u * np.float32(0.1)
    elif kind == "bn_running_var":
        value = np.float32(0.75) + u * np.float32(0.25)
    else:
        raise ValueError(f"no formula for {name} ({kind})")
    return value.astype(np.float32).reshape(shape)


def kind_of(key, shape, keys):
    """The role of an upstream key: BatchNorm parameters are recognised by their running stats."""
    prefix, _, leaf = key.rpartition(".")
    if f"{prefix}.running_mean" in keys:
        return {
            "weight": "bn_weight",
            "bias": "bn_bias",
            "running_mean": "bn_running_mean",
            "running_var": "bn_running_var",
            "num_batches_tracked": "bn_count",
        }[leaf]
    if leaf == "weight" and len(shape) == 4:
        return "conv_weight"
    if leaf == "bias" and len(shape) == 1:
        return "conv_bias"
    raise ValueError(f"unrecognised key {key} {shape}")


def state_dict(layout):
    """Synthetic values for every entry of an upstream layout [(key, dtype, shape)]."""
    import torch

    keys = {key for key, _, _ in layout}
    out = {}
    for key, dtype, shape in layout:
        kind = kind_of(key, shape, keys)
        if kind == "bn_count":
            out[key] = torch.tensor(0, dtype=torch.int64)
        else:
            out[key] = torch.from_numpy(tensor(key, shape, kind))
    return out


def dpt_kind_of(key, shape):
    """The role of a DPT-Hybrid key: token/position embeddings, norm affines, weights, biases."""
    path = key.split(".")
    leaf = path[-1]
    if leaf in ("cls_token", "pos_embed"):
        return "embedding"
    if len(path) >= 2 and path[-2].startswith("norm"):
        if leaf == "weight":
            return "norm_weight"
        if leaf == "bias":
            return "norm_bias"
    if leaf == "weight" and len(shape) >= 2:
        return "weight"
    if leaf == "bias" and len(shape) == 1:
        return "bias"
    raise ValueError(f"unrecognised DPT key {key} {shape}")


def dpt_tensor(name, shape, kind=None):
    """One synthetic DPT-Hybrid (or Depth Anything V2) tensor, from the stream of its full upstream key."""
    kind = kind or dpt_kind_of(name, shape)
    count = int(np.prod(shape)) if shape else 1
    u = uniform(name, count)
    if kind == "embedding":
        value = u * np.float32(0.1)
    elif kind == "norm_weight":
        value = np.float32(1.0) + u * np.float32(0.1)
    elif kind == "norm_bias":
        value = u * np.float32(0.1)
    elif kind == "weight":
        # Convolutions and Linear layers alike, in PyTorch's shape ([out, in] for Linear).
        fan_in = int(np.prod(shape[1:]))
        value = u * np.float32(math.sqrt(3.0 / fan_in))
    elif kind == "bias":
        value = u * np.float32(0.05)
    elif kind == "head_bias":
        # Depth Anything V2's last bias: most of the untrained output above the final ReLU.
        value = np.float32(3.0) + u * np.float32(0.05)
    else:
        raise ValueError(f"no formula for {name} ({kind})")
    return value.astype(np.float32).reshape(shape)


def dpt_state_dict(layout):
    """Synthetic values for every entry of a DPT-Hybrid layout [(key, dtype, shape)]."""
    import torch

    out = {}
    for key, dtype, shape in layout:
        if dtype != "float32":
            raise ValueError(f"unexpected dtype {dtype} for {key}")
        out[key] = torch.from_numpy(dpt_tensor(key, tuple(shape)))
    return out


def depth_anything_kind_of(key, shape):
    """The role of a Depth Anything V2 key, which decides its formula (as Rust's `Role`)."""
    path = key.split(".")
    leaf = path[-1]
    if leaf in ("cls_token", "pos_embed", "mask_token"):
        return "embedding"
    if leaf == "gamma":
        # DINOv2's LayerScale: 1 +- 0.1, like a norm's scale.
        return "norm_weight"
    if key.endswith("depth_head.scratch.output_conv2.2.bias"):
        return "head_bias"
    return dpt_kind_of(key, shape)


def depth_anything_state_dict(layout):
    """Synthetic values for every entry of a Depth Anything V2 layout [(key, dtype, shape)]."""
    import torch

    out = {}
    for key, dtype, shape in layout:
        if dtype != "float32":
            raise ValueError(f"unexpected dtype {dtype} for {key}")
        shape = tuple(shape)
        kind = depth_anything_kind_of(key, shape)
        out[key] = torch.from_numpy(dpt_tensor(key, shape, kind))
    return out


def network_input(width, height):
    """A normalised NCHW input in [-2, 2) for the forward parity fixtures."""
    return (uniform(f"input.{width}x{height}", 3 * height * width) * np.float32(2.0)).reshape(
        1, 3, height, width
    )
