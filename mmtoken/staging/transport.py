"""Moving nested structures of tensors (encodings, requests) between stages with `torch.distributed`: the structure
and its non-tensor leaves as one pickled object, each tensor by `send` / `recv` on the group's device, so NCCL
moves GPU tensors GPU to GPU and gloo moves CPU tensors in the tests."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_unflatten


def send_tree(tree: object, destination: int, group: dist.ProcessGroup, device: torch.device) -> None:
    """Send `tree` (dicts, lists, tuples, transformers outputs, tensors and picklable leaves) to `destination`."""
    leaves, spec = tree_flatten(tree)
    tensors = [index for index, leaf in enumerate(leaves) if torch.is_tensor(leaf)]
    header = {
        "spec": spec,
        "leaves": [None if torch.is_tensor(leaf) else leaf for leaf in leaves],
        "tensors": [(index, tuple(leaves[index].shape), leaves[index].dtype) for index in tensors],
    }
    dist.send_object_list([header], dst=destination, group=group, device=device)
    for index in tensors:
        dist.send(leaves[index].detach().to(device).contiguous(), dst=destination, group=group)


def recv_tree(source: int, group: dist.ProcessGroup, device: torch.device) -> object:
    """Receive a tree `send_tree` sent from `source`, its tensors on `device`."""
    box = [None]
    dist.recv_object_list(box, src=source, group=group, device=device)
    header = box[0]
    leaves = list(header["leaves"])
    for index, shape, dtype in header["tensors"]:
        tensor = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(tensor, src=source, group=group)
        leaves[index] = tensor
    return tree_unflatten(leaves, header["spec"])
