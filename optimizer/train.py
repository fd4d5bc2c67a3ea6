"""Train the demo classifier: a small MONAI DenseNet on the synthetic radiographs.

The optimizer itself never trains; this exists so the demo has a real trained model with a
non-saturated task metric, made from data synthesized on the spot.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from optimizer import checkpoint
from optimizer.dataset import LabelledSet

LOG = logging.getLogger(__name__)

DEMO_ARCHITECTURE = "DenseNet"
DEMO_KWARGS: dict[str, Any] = {
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 1,
    "init_features": 16,
    "growth_rate": 8,
    "block_config": (3, 3, 3),
    "bn_size": 2,
}


def train_classifier(
    data: LabelledSet, epochs: int, seed: int, batch_size: int = 32, lr: float = 5e-3
) -> nn.Module:
    """Binary classifier trained with BCE on logits; horizontal flips as augmentation."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = checkpoint.build(DEMO_ARCHITECTURE, DEMO_KWARGS)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * ((len(data) + batch_size - 1) // batch_size)
    )
    loss_fn = nn.BCEWithLogitsLoss()
    x_all = torch.from_numpy(data.inputs)
    y_all = torch.from_numpy(data.labels.astype(np.float32))
    model.train()
    for epoch in range(epochs):
        start, total = time.perf_counter(), 0.0
        order = torch.from_numpy(rng.permutation(len(data)))
        for i in range(0, len(data), batch_size):
            idx = order[i : i + batch_size]
            x, y = x_all[idx], y_all[idx]
            if rng.random() < 0.5:
                x = torch.flip(x, dims=[3])
            loss = loss_fn(model(x).squeeze(1), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        LOG.info("epoch %d/%d loss %.4f (%.1fs)", epoch + 1, epochs, total / len(data),
                 time.perf_counter() - start)
    return model.eval()
