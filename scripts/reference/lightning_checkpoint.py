#!/usr/bin/env python3
"""Write PyTorch Lightning checkpoints of DPT-Hybrid weights, made by a real `pytorch_lightning.Trainer`.

The fine-tuned DPT-Hybrid ships as a `.ckpt` that Lightning's `ModelCheckpoint` wrote during training:
a `torch.save` archive whose `state_dict` holds `model.<upstream key>` entries next to the optimizer
state, loops, callbacks and version. These checkpoints come from the same machinery (Trainer +
ModelCheckpoint + EarlyStopping on `val_loss`, `save_weights_only=False`), trained for one step with
Adam at lr = 0, so every weight still equals `synthetic.dpt_tensor` of its upstream key while Adam's
`exp_avg` / `exp_avg_sq` are written for each parameter that received a gradient.

    /tmp/midas-ref/bin/pip install -r scripts/reference/requirements.txt pytorch_lightning timm==0.6.13
    /tmp/midas-ref/bin/python scripts/reference/lightning_checkpoint.py

writes tests/fixtures/checkpoints/dpt_tiny.ckpt: a handful of real DPT-Hybrid keys with their real
shapes (one of them unused by the forward, so it gets no gradient and no Adam state), a few tens of KB.

    /tmp/midas-ref/bin/python scripts/reference/lightning_checkpoint.py --midas-src /tmp/MiDaS --full /tmp/dpt_full.ckpt

writes a full-size checkpoint instead (all 368 keys of upstream's DPT_Hybrid, about 1.46 GB, the size
of the real one) for manual tests; it is never committed.
"""

import argparse
import pathlib
import shutil
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY_PATH = ROOT / "tests" / "fixtures" / "checkpoints" / "dpt_tiny.ckpt"

# Real DPT-Hybrid keys and shapes, chosen small, in upstream's state_dict order (which the module tree
# below reproduces). refinenet4's first residual unit is never called by the forward: like it, its
# bias gets no gradient here and so no Adam state.
TINY_KEYS = [
    ("pretrained.model.cls_token", (1, 1, 768)),
    ("pretrained.model.blocks.0.norm1.weight", (768,)),
    ("pretrained.model.blocks.0.norm1.bias", (768,)),
    ("scratch.refinenet1.out_conv.bias", (256,)),
    ("scratch.refinenet4.resConfUnit1.conv1.bias", (256,)),
    ("scratch.output_conv.2.bias", (32,)),
    ("scratch.output_conv.4.weight", (1, 32, 1, 1)),
    ("scratch.output_conv.4.bias", (1,)),
]
TINY_UNUSED = {"scratch.refinenet4.resConfUnit1.conv1.bias"}
# The parameters upstream's DPT-Hybrid forward never reads: no gradient, so no Adam state.
FULL_UNUSED = {
    "pretrained.model.norm.weight", "pretrained.model.norm.bias",
    "pretrained.model.head.weight", "pretrained.model.head.bias",
    "scratch.refinenet4.resConfUnit1.conv1.weight", "scratch.refinenet4.resConfUnit1.conv1.bias",
    "scratch.refinenet4.resConfUnit1.conv2.weight", "scratch.refinenet4.resConfUnit1.conv2.bias",
}


class KeyTree(nn.Module):
    """An nn.Module tree whose parameters are exactly `keys` (dotted upstream names), set by formula."""

    def __init__(self, keys):
        super().__init__()
        for key, shape in keys:
            *path, leaf = key.split(".")
            module = self
            for name in path:
                if name not in module._modules:
                    module.add_module(name, nn.Module())
                module = module._modules[name]
            module.register_parameter(leaf, nn.Parameter(torch.from_numpy(synthetic.dpt_tensor(key, shape))))

    def forward(self, x):
        """x [B, 32, h, w] -> [B]; uses every parameter except those in TINY_UNUSED."""
        p = dict(self.named_parameters())
        head = F.conv2d(F.relu(x + p["scratch.output_conv.2.bias"].view(1, -1, 1, 1)),
                        p["scratch.output_conv.4.weight"], p["scratch.output_conv.4.bias"])
        token = F.layer_norm(p["pretrained.model.cls_token"], (768,),
                             p["pretrained.model.blocks.0.norm1.weight"],
                             p["pretrained.model.blocks.0.norm1.bias"], eps=1e-6)
        return head.mean(dim=(1, 2, 3)) + token.mean() + p["scratch.refinenet1.out_conv.bias"].mean()


def make_module(model, lr):
    import pytorch_lightning as pl

    class FineTuner(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, _index):
            x, target = batch
            prediction = self(x).reshape(target.shape[0], -1).mean(dim=1)
            return F.mse_loss(prediction, target)

        def validation_step(self, batch, _index):
            x, target = batch
            prediction = self(x).reshape(target.shape[0], -1).mean(dim=1)
            self.log("val_loss", F.mse_loss(prediction, target))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=lr)

    return FineTuner()


def train_one_step(model, input_shape, out_path):
    """Fit `model` for one step (Adam, lr 0) and copy the checkpoint ModelCheckpoint wrote to out_path."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    data = TensorDataset(torch.rand(1, *input_shape), torch.rand(1))
    module = make_module(model, lr=0.0)
    # ModelCheckpoint records its directory in the file: a fixed one keeps the output reproducible.
    tmp = pathlib.Path(tempfile.gettempdir()) / "dpt-lightning-checkpoint"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        checkpoint = ModelCheckpoint(dirpath=tmp, filename="dpt", monitor="val_loss", mode="min",
                                     save_top_k=1, save_weights_only=False)
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=1, max_epochs=1, limit_train_batches=1,
            limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp,
            callbacks=[EarlyStopping(monitor="val_loss", mode="min"), checkpoint],
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            trainer.fit(module, DataLoader(data, batch_size=1), DataLoader(data, batch_size=1))
        out_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(checkpoint.best_model_path, out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verify(path, keys):
    """Reload with weights_only=True; weights must equal the formula bit for bit. Returns the checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    assert list(state) == [f"model.{key}" for key, _ in keys], "state_dict keys differ"
    for key, shape in keys:
        expected = synthetic.dpt_tensor(key, tuple(shape))
        value = state[f"model.{key}"].numpy()
        assert value.dtype == np.float32 and value.shape == tuple(shape), key
        assert np.array_equal(value.view(np.uint32), expected.view(np.uint32)), f"{key} differs from the formula"
    return ckpt


def report(path, ckpt, show_keys):
    states = ckpt["optimizer_states"][0]["state"]
    tensors = sum(1 for entry in states.values() for value in entry.values() if torch.is_tensor(value))
    print(f"{path}: {path.stat().st_size} bytes")
    print(f"top-level keys: {list(ckpt)}")
    print(f"epoch {ckpt['epoch']}, global_step {ckpt['global_step']}, "
          f"pytorch-lightning {ckpt['pytorch-lightning_version']}, lr_schedulers {ckpt['lr_schedulers']}")
    print(f"callbacks: {list(ckpt['callbacks'])}")
    print(f"loops: {list(ckpt['loops'])}")
    print(f"state_dict: {len(ckpt['state_dict'])} keys")
    if show_keys:
        for key, value in ckpt["state_dict"].items():
            print(f"  {key} {list(value.shape)}")
    print(f"optimizer: {len(states)} parameters with state, {tensors} state tensors "
          f"(of which {sum(1 for e in states.values() for k in e if k != 'step')} exp_avg/exp_avg_sq), "
          f"param_groups {[{k: v for k, v in g.items() if k != 'params'} for g in ckpt['optimizer_states'][0]['param_groups']]}")


def tiny():
    model = KeyTree(TINY_KEYS)
    train_one_step(model, (32, 4, 4), TINY_PATH)
    ckpt = verify(TINY_PATH, TINY_KEYS)
    states = ckpt["optimizer_states"][0]["state"]
    with_state = {TINY_KEYS[i][0] for i in states}
    assert with_state == {key for key, _ in TINY_KEYS} - TINY_UNUSED, sorted(with_state)
    report(TINY_PATH, ckpt, show_keys=True)


def full(midas_src, path):
    import upstream

    model = upstream.build_dpt_hybrid(upstream.load_dpt(midas_src))
    keys = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
    layout = [(key, "float32", shape) for key, shape in keys]
    model.load_state_dict(synthetic.dpt_state_dict(layout), strict=True)
    model.train()  # as a freshly built module is; DPT-Hybrid has no dropout or BatchNorm to care
    start = time.perf_counter()
    train_one_step(model, (3, 64, 64), path)
    seconds = time.perf_counter() - start
    ckpt = verify(path, keys)
    states = ckpt["optimizer_states"][0]["state"]
    without_state = {keys[i][0] for i in range(len(keys)) if i not in states}
    assert without_state == FULL_UNUSED, sorted(without_state)
    report(path, ckpt, show_keys=False)
    print(f"training step and save: {seconds:.1f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", type=pathlib.Path, metavar="PATH",
                        help="write a full-size DPT-Hybrid checkpoint to PATH instead of the tiny fixture")
    parser.add_argument("--midas-src", type=pathlib.Path, help="isl-org/MiDaS checkout (for --full)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.full:
        if args.midas_src is None:
            parser.error("--full needs --midas-src")
        full(args.midas_src, args.full)
    else:
        tiny()


if __name__ == "__main__":
    main()
