"""The range detector's network: the original network with one more output, per bound site the
largest activation relative to its channel's clean scale (`clean_scales`: about the 99th
percentile of the channel's per-image maxima over the correctly classified clean images).

It is the original network (no bound is applied), traced at the same call sites as the bounded
network, so the guard reads the ratios off the forward pass it runs anyway. The statistic over
them (`guard.mmdf.range_statistic`) and its null live in the torch-free guard code.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import fx, nn

from calibrate.bounded import BoundedNetwork
from calibrate.device import device_of
from calibrate.errors import CalibrationError

RATIO_OUTPUT = "activation_ratio"
RANGE_SHARE = 0.01
"""A channel's clean scale is the k-th largest of its per-image maxima over the clean images,
k = ceil(RANGE_SHARE * n) (about the 99th percentile; the maximum up to 100 images). The
maximum alone is one image's value: on the CIFAR-10 benchmark models (3,000 clean and
triggered test images each) the 5th largest of about 430 lifted the triggered inputs flagged at
a matched 0.5% clean rate on five of nine (all-to-all 65% -> 83%, chessboard 58% -> 80%, WaNet
trained 24 epochs 68% -> 79%), cost at most 2 points on three and left BadNets at 100%."""
RANGE_FLOOR = 0.05
"""A channel's clean maximum counts as at least this fraction of the median over its site's
active channels. A nearly dead channel (one clean maximum of 1e-4 against a median of 0.7 in
the stem of the full-width benchmark WaNet model) would otherwise turn any small activation
into a huge ratio. On that model, 3,000 clean and 2,919 triggered test images: one clean image
flagged without the floor, none with it; the same triggered images flagged (0.01 to 0.25 alike)."""


def ratio_denominators(clean_scale: torch.Tensor, floor: float = RANGE_FLOOR) -> torch.Tensor:
    """Each channel's clean scale (`clean_scales`), raised to `floor` times the median over the
    site's active channels; 0 stays 0 (a channel never active on the clean images is left out).
    `clean_scale` is [C], or [N, C] for one set of scales per row (the leave-one-out ones)."""
    u = clean_scale.detach().float()
    active = u > 0
    median = torch.nanquantile(torch.where(active, u, torch.nan), 0.5, dim=-1, keepdim=True)
    return torch.where(active, torch.maximum(u, floor * median), torch.zeros_like(u))


def inverse_scales(clean_scale: torch.Tensor, floor: float = RANGE_FLOOR) -> torch.Tensor:
    """1 / `ratio_denominators`, and 0 where a channel counts 0: what an activation is
    multiplied by to give its ratio."""
    d = ratio_denominators(clean_scale, floor)
    return torch.where(d > 0, 1.0 / d.clamp(min=1e-30), torch.zeros_like(d))


class SiteRatio(nn.Module):
    """[N, C, ...] activation -> [N, 1]: max over channels and positions of a / u_c, where u_c
    is the channel's clean scale (floored: `ratio_denominators`). A channel never active on
    the clean images (u_c = 0) counts 0: it has no clean range to leave, and the bounded network
    already holds it at 0. Three ONNX nodes: the positions' max first, so the scaling touches
    [N, C] values only."""

    def __init__(self, clean_scale: torch.Tensor) -> None:
        super().__init__()
        self.inv_scale: torch.Tensor
        self.register_buffer("inv_scale", inverse_scales(clean_scale))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        positions = tuple(range(2, a.dim()))
        per_channel = a.amax(dim=positions) if positions else a
        return (per_channel * self.inv_scale).amax(dim=1, keepdim=True)


def per_image_maxima(
    net: BoundedNetwork, images: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per site [N, C]: each image's largest activation per channel (over positions, and at
    least 0) in the ORIGINAL network (the bounds are lifted while recording and restored
    afterwards); and the original network's logits [N, K] from the same forward passes. The
    passes run on `net`'s device; the results come back on the CPU."""
    saved = [b.detach().clone() for b in net.bounds()]
    per_site: list[list[torch.Tensor]] = [[] for _ in net.sites]

    def record(i: int) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            a = inputs[0].detach()
            positions = tuple(range(2, a.dim()))
            per_site[i].append((a.amax(dim=positions) if positions else a).clamp(min=0.0).cpu())

        return hook

    hooks = [m.register_forward_hook(record(i)) for i, m in enumerate(net.bound_modules())]
    try:
        with torch.no_grad():
            for b in net.bounds():
                b.fill_(float("inf"))
            device = device_of(net)
            logits = [
                net(images[i : i + batch_size].to(device)).cpu()
                for i in range(0, images.shape[0], batch_size)
            ]
        return [torch.cat(chunks).float() for chunks in per_site], torch.cat(logits)
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for b, value in zip(net.bounds(), saved, strict=True):
                b.copy_(value)


def scale_rank(n_inside: int, share: float = RANGE_SHARE) -> int:
    """k: a channel's clean scale is the k-th largest of its per-image maxima over `n_inside`
    images, k = ceil(share * n_inside) (1, the maximum, up to 1 / share images)."""
    return max(1, math.ceil(share * n_inside - 1e-9))


def clean_scales(
    per_image: Sequence[torch.Tensor], inside: np.ndarray | None = None
) -> list[torch.Tensor]:
    """Per site [C]: each channel's clean scale, the `scale_rank`-th largest of the `inside`
    images' per-image maxima (default: all images), or their largest where fewer than k of
    them activate the channel (a channel active on no image stays 0)."""
    n = int(per_image[0].shape[0]) if per_image else 0
    rows = torch.from_numpy(np.arange(n) if inside is None else np.flatnonzero(inside))
    k = scale_rank(int(rows.numel()))
    scales = []
    for a in per_image:
        top = torch.topk(a.float()[rows], k, dim=0).values
        scales.append(torch.where(top[-1] > 0, top[-1], top[0]))
    return scales


def leave_one_out_ratios(
    per_image: Sequence[torch.Tensor],
    inside: np.ndarray | None = None,
    floor: float = RANGE_FLOOR,
) -> np.ndarray:
    """[N, S]: per site, each image's largest ratio as `SiteRatio` computes a new image's, with
    the clean scales (`clean_scales`) taken over the `inside` images (default: all) OTHER than
    itself. An image outside them is measured against all of them, as a new image is; one
    inside against the other N_in - 1 (leave one out: where it is among a channel's k largest,
    that channel's scale is the next one down). A new clean image's ratios are distributed as
    one of these (exchangeability), so every clean image serves the null, none is spent on it.
    `per_image`: per site [N, C], as `per_image_maxima` returns."""
    n = int(per_image[0].shape[0]) if per_image else 0
    rows = np.arange(n) if inside is None else np.flatnonzero(inside)
    if inside is not None and len(inside) != n:
        raise CalibrationError(f"{len(inside)} inside flags for {n} images")
    if rows.size < 2:
        raise CalibrationError(
            "the range detector's clean scales need at least 2 clean images the network "
            f"classifies correctly, got {rows.size}"
        )
    k = scale_rank(int(rows.size))  # the scale over all N_in; k <= N_in - 1 for N_in >= 2
    index = torch.from_numpy(rows)
    out = np.zeros((n, len(per_image)), dtype=np.float32)
    for s, a in enumerate(per_image):
        a = a.float()
        channels = a.shape[1]
        top = torch.topk(a[index], k + 1, dim=0)  # per channel the k + 1 largest, and whose
        among = torch.zeros(n, channels, dtype=torch.bool)
        among[index[top.indices[:k]], torch.arange(channels).expand(k, channels)] = True
        kth = torch.where(among, top.values[k], top.values[k - 1])  # of the others
        first = torch.zeros(n, channels, dtype=torch.bool)
        first[index[top.indices[0]], torch.arange(channels)] = True
        largest = torch.where(first, top.values[1], top.values[0])  # of the others
        u = torch.where(kth > 0, kth, largest)
        out[:, s] = (a * inverse_scales(u, floor)).amax(dim=1).numpy()
    return out


class RangeNetwork(nn.Module):
    """The original network returning (logits [N, K], activation ratios [N, S])."""

    def __init__(self, net: BoundedNetwork, scales: list[torch.Tensor]) -> None:
        super().__init__()
        if len(scales) != len(net.sites):
            raise CalibrationError(f"{len(scales)} clean scales for {len(net.sites)} bound sites")
        gm: fx.GraphModule = copy.deepcopy(net.net)
        device = device_of(gm)
        graph = gm.graph
        calls = {n.target: n for n in graph.nodes if n.op == "call_module"}
        ratios = []
        for site, u in zip(net.sites, scales, strict=True):
            node = calls[site.name]
            activation = node.args[0]
            gm.add_submodule(f"ratio_{site.name}", SiteRatio(u).to(device))
            with graph.inserting_after(node):
                ratios.append(graph.call_module(f"ratio_{site.name}", (activation,)))
            node.replace_all_uses_with(activation)  # the original network: no bound
            graph.erase_node(node)
            gm.delete_submodule(site.name)
        output = next(n for n in graph.nodes if n.op == "output")
        with graph.inserting_before(output):
            stacked = graph.call_function(torch.cat, (ratios, 1))
        output.args = ((output.args[0], stacked),)
        graph.lint()
        gm.recompile()
        self.net = gm
        self.sites = net.sites
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, ratios = self.net(x)
        return logits, ratios

    @torch.no_grad()
    def ratios(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The activation ratios [N, S] of `x`, in chunks."""
        device = device_of(self)
        return torch.cat(
            [self(x[i : i + batch_size].to(device))[1].cpu() for i in range(0, len(x), batch_size)]
        )
