"""Training-time augmentation shared by the trainers: the sky has no preferred orientation, so a stamp turned
by a quarter turn or mirrored is as likely as the original."""
from __future__ import annotations

import torch


def dihedral(ts: list[torch.Tensor], g: torch.Generator) -> list[torch.Tensor]:
    """The same random quarter turn and left-right flip (drawn from `g`, in that order) applied to every
    (N, C, H, W) tensor of `ts`, so that images and their pixel targets stay aligned."""
    k = int(torch.randint(0, 4, (1,), generator=g))
    flip = bool(torch.randint(0, 2, (1,), generator=g))
    out = []
    for t in ts:
        t = torch.rot90(t, k, dims=(2, 3))
        out.append(torch.flip(t, dims=(3,)) if flip else t)
    return out
