"""Import MiDaS v2.1 small and DPT-Hybrid from an upstream isl-org/MiDaS checkout, without torch.hub.

Upstream builds the EfficientNet-Lite3 backbone with `torch.hub.load("rwightman/gen-efficientnet-pytorch", ...)`,
which needs the network. The same code ships on PyPI as `geffnet`, so the hub call is routed to it.
`midas/blocks.py` also imports every transformer backbone (and with them `timm`) at module level; the
ones a model does not use are registered as placeholders that fail loudly if ever called (several of
them do not import under timm 0.6.13). DPT-Hybrid keeps the real `vit` backbone, whose timm model is
built with `pretrained=False`; downloads are blocked so that no ImageNet weights are ever fetched.
"""

import sys
import types

import geffnet
import torch

TRANSFORMER_BACKBONES = ["beit", "swin_common", "swin2", "swin", "levit", "vit", "next_vit"]


def _placeholder(name, model):
    module = types.ModuleType(name)

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def unavailable(*_args, **_kwargs):
            raise RuntimeError(f"{name}.{attr} is not part of {model}")

        return unavailable

    module.__getattr__ = __getattr__
    return module


def _hub_load(repo, name, pretrained=False, exportable=True, **_kwargs):
    if repo != "rwightman/gen-efficientnet-pytorch":
        raise RuntimeError(f"unexpected torch.hub repository {repo}")
    # ImageNet weights are irrelevant: every parameter is overwritten by the state dict.
    return getattr(geffnet, name)(pretrained=False, exportable=exportable)


def _no_download(*args, **_kwargs):
    raise RuntimeError(f"refusing to download {args[0] if args else 'a file'}: weights come from the formula")


def _prepare(midas_src, keep, model):
    sys.path.insert(0, str(midas_src))
    for backbone in TRANSFORMER_BACKBONES:
        if backbone not in keep:
            sys.modules[f"midas.backbones.{backbone}"] = _placeholder(f"midas.backbones.{backbone}", model)
    torch.hub.load = _hub_load
    torch.hub.load_state_dict_from_url = _no_download
    torch.hub.download_url_to_file = _no_download


def load_upstream(midas_src):
    """Return upstream's (MidasNet_small class, transforms module, utils module)."""
    _prepare(midas_src, keep=(), model="MiDaS v2.1 small")
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


def load_dpt(midas_src):
    """Return upstream's DPTDepthModel class, with only the `vit` backbone really imported."""
    _prepare(midas_src, keep=("vit",), model="DPT-Hybrid")
    import timm

    create_model = timm.create_model

    def create_untrained(name, pretrained=False, **kwargs):
        if pretrained:
            raise RuntimeError(f"timm.create_model({name!r}, pretrained=True) would download weights")
        return create_model(name, pretrained=False, **kwargs)

    timm.create_model = create_untrained
    from midas.dpt_depth import DPTDepthModel

    return DPTDepthModel


def build_dpt_hybrid(DPTDepthModel):
    """DPT-Hybrid exactly as upstream's hubconf builds `DPT_Hybrid(pretrained=False)`."""
    model = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
    return model.eval()
