"""How much of each object a v2 probe model's visual tokens show: a linear probe (softmax regression) of the
colour, shape and material of every object from the projected feature at its centre patch, on 384 fresh probe
world v2 scenes (three quarters to fit, a quarter to score), for each checkpoint folder given and for the recipe's
untrained tower. LLaVA-format (576-token) models only.

    python scripts/probe_features.py probe-llava-v2 TOWER_DIR QA_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from mmtoken.zoo import world
from mmtoken.zoo.formats import probe_format
from mmtoken.zoo.recipes import IMAGE_SIZE, PATCH_SIZE, RECIPES
from mmtoken.zoo.train import load_checkpoint

GRID = IMAGE_SIZE // PATCH_SIZE  # patches a side


def centre_features(model, processor, scenes) -> torch.Tensor:
    """(objects, width): the projected feature at each visible object's centre patch in the first frame."""
    model.eval()
    with torch.no_grad():
        features = probe_format(model, processor).image_features(scenes)
    objects = scenes.objects
    rows, slots = objects.active[:, 0].nonzero(as_tuple=True)
    column, row = (objects.centre[rows, 0, slots] // PATCH_SIZE).clamp(0, GRID - 1).long().unbind(-1)
    return features[rows, row * GRID + column].float()


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Held-out accuracy of a softmax regression from standardised `features` to `labels`."""
    x = (features - features.mean(0)) / (features.std(0) + 1e-6)
    fit = len(x) * 3 // 4
    weight = torch.zeros(x.shape[1], int(labels.max()) + 1, requires_grad=True)
    bias = torch.zeros(weight.shape[1], requires_grad=True)
    optimiser = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(300):
        optimiser.zero_grad()
        loss = F.cross_entropy(x[:fit] @ weight + bias, labels[:fit]) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        return float(((x[fit:] @ weight + bias).argmax(1) == labels[fit:]).float().mean())


def main(name: str, folders: list[Path]) -> None:
    torch.manual_seed(0)
    scenes = world.render_batch("image", 384, torch.Generator().manual_seed(1), torch.device("cpu"))
    objects = scenes.objects
    rows, slots = objects.active[:, 0].nonzero(as_tuple=True)
    labels = {key: getattr(objects, key)[rows, slots] for key in ("color", "shape", "material")}
    held_out = len(rows) - len(rows) * 3 // 4
    majority = {key: torch.bincount(value[-held_out:]).max().item() / held_out for key, value in labels.items()}
    print(f"{len(rows)} objects; majority class: " + ", ".join(f"{k} {v:.2f}" for k, v in majority.items()))
    models = [(str(folder), load_checkpoint(folder)[:2]) for folder in folders] + [("untrained", RECIPES[name]())]
    for label, (model, processor) in models:
        features = centre_features(model, processor, scenes)
        scores = {key: probe_accuracy(features, value) for key, value in labels.items()}
        print(f"{label}: " + ", ".join(f"{key} {value:.2f}" for key, value in scores.items()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [Path(folder) for folder in sys.argv[2:]])
