"""Import MiDaS v2.1 small from an upstream isl-org/MiDaS checkout, without torch.hub.

Upstream builds the EfficientNet-Lite3 backbone with `torch.hub.load("rwightman/gen-efficientnet-pytorch", ...)`,
which needs the network. The same code ships on PyPI as `geffnet`, so the hub call is routed to it.
`midas/blocks.py` also imports the transformer backbones (and with them `timm`) at module level; MiDaS
small uses none of them, so they are registered as placeholders that fail loudly if ever called.
"""

import sys
import types

import geffnet
import torch

TRANSFORMER_BACKBONES = ["beit", "swin_common", "swin2", "swin", "levit", "vit", "next_vit"]


def _placeholder(name):
    module = types.ModuleType(name)

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def unavailable(*_args, **_kwargs):
            raise RuntimeError(f"{name}.{attr} is not part of MiDaS v2.1 small")

        return unavailable

    module.__getattr__ = __getattr__
    return module


def _hub_load(repo, name, pretrained=False, exportable=True, **_kwargs):
    if repo != "rwightman/gen-efficientnet-pytorch":
        raise RuntimeError(f"unexpected torch.hub repository {repo}")
    # ImageNet weights are irrelevant: every parameter is overwritten by the state dict.
    return getattr(geffnet, name)(pretrained=False, exportable=exportable)


def load_upstream(midas_src):
    """Return upstream's (MidasNet_small class, transforms module, utils module)."""
    sys.path.insert(0, str(midas_src))
    for backbone in TRANSFORMER_BACKBONES:
        sys.modules[f"midas.backbones.{backbone}"] = _placeholder(f"midas.backbones.{backbone}")
    torch.hub.load = _hub_load
    from midas import transforms
    from midas.midas_net_custom import MidasNet_small
    import utils

    return MidasNet_small, transforms, utils


def build_small(MidasNet_small):
    """MiDaS v2.1 small exactly as upstream's model_loader builds `midas_v21_small_256`."""
    model = MidasNet_small(
        None,
        features=64,
        backbone="efficientnet_lite3",
        exportable=True,
        non_negative=True,
        blocks={"expand": True},
    )
    return model.eval()
