"""The range detector's network: the original network with one more output, per bound site the
largest activation relative to its channel's largest on the clean calibration images.

It is the original network (no bound is applied), traced at the same call sites as the bounded
network, so the guard reads the ratios off the forward pass it runs anyway. The statistic over
them (`guard.mmdf.range_statistic`) and its null live in the torch-free guard code.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import fx, nn

from calibrate.bounded import BoundedNetwork
from calibrate.errors import CalibrationError

RATIO_OUTPUT = "activation_ratio"
RANGE_FLOOR = 0.05
"""A channel's clean maximum counts as at least this fraction of the median over its site's
active channels. A nearly dead channel (one clean maximum of 1e-4 against a median of 0.7 in
the stem of the full-width benchmark WaNet model) would otherwise turn any small activation
into a huge ratio. On that model, 3,000 clean and 2,919 triggered test images: one clean image
flagged without the floor, none with it; the same triggered images flagged (0.01 to 0.25 alike)."""


def ratio_denominators(clean_max: torch.Tensor, floor: float = RANGE_FLOOR) -> torch.Tensor:
    """Each channel's clean maximum, raised to `floor` times the median over the site's active
    channels; 0 stays 0 (a channel never active on the clean images is left out)."""
    u = clean_max.detach().float()
    active = u[u > 0]
    if active.numel() == 0:
        return torch.zeros_like(u)
    return torch.where(
        u > 0, u.clamp(min=floor * float(torch.quantile(active, 0.5))), torch.zeros_like(u)
    )


class SiteRatio(nn.Module):
    """[N, C, ...] activation -> [N, 1]: max over channels and positions of a / u_c, where u_c
    is the channel's clean maximum (floored: `ratio_denominators`). A channel never active on
    the clean images (u_c = 0) counts 0: it has no clean range to leave, and the bounded network
    already holds it at 0. Three ONNX nodes: the positions' max first, so the scaling touches
    [N, C] values only."""

    def __init__(self, clean_max: torch.Tensor) -> None:
        super().__init__()
        u = ratio_denominators(clean_max)
        self.inv_scale: torch.Tensor
        self.register_buffer("inv_scale", torch.where(u > 0, 1.0 / u, torch.zeros_like(u)))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        positions = tuple(range(2, a.dim()))
        per_channel = a.amax(dim=positions) if positions else a
        return (per_channel * self.inv_scale).amax(dim=1, keepdim=True)


def per_image_maxima(
    net: BoundedNetwork, images: torch.Tensor, batch_size: int
) -> list[torch.Tensor]:
    """Per site [N, C]: each image's largest activation per channel (over positions, and at
    least 0) in the ORIGINAL network (the bounds are lifted while recording and restored
    afterwards)."""
    saved = [b.detach().clone() for b in net.bounds()]
    per_site: list[list[torch.Tensor]] = [[] for _ in net.sites]

    def record(i: int) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            a = inputs[0].detach()
            positions = tuple(range(2, a.dim()))
            per_site[i].append((a.amax(dim=positions) if positions else a).clamp(min=0.0))

        return hook

    hooks = [m.register_forward_hook(record(i)) for i, m in enumerate(net.bound_modules())]
    try:
        with torch.no_grad():
            for b in net.bounds():
                b.fill_(float("inf"))
            for i in range(0, images.shape[0], batch_size):
                net(images[i : i + batch_size])
        return [torch.cat(chunks).float() for chunks in per_site]
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for b, value in zip(net.bounds(), saved, strict=True):
                b.copy_(value)


def clean_maxima(net: BoundedNetwork, images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Per site, each channel's largest activation over `images` in the ORIGINAL network."""
    return [a.amax(dim=0) for a in per_image_maxima(net, images, batch_size)]


def leave_one_out_ratios(
    per_image: Sequence[torch.Tensor],
    inside: np.ndarray | None = None,
    floor: float = RANGE_FLOOR,
) -> np.ndarray:
    """[N, S]: per site, each image's largest ratio as `SiteRatio` computes a new image's, with
    the clean maxima taken over the `inside` images (default: all) OTHER than itself. An image
    outside them is measured against all of them, as a new image is; one inside against the
    other N_in - 1 (leave one out). A new clean image's ratios are distributed as one of these
    (exchangeability), so every clean image serves the null, none is spent on it.
    `per_image`: per site [N, C], as `per_image_maxima` returns."""
    n = int(per_image[0].shape[0]) if per_image else 0
    rows = np.arange(n) if inside is None else np.flatnonzero(inside)
    if inside is not None and len(inside) != n:
        raise CalibrationError(f"{len(inside)} inside flags for {n} images")
    if rows.size < 2:
        raise CalibrationError(
            f"the range detector's clean maxima need at least 2 images, got {rows.size}"
        )

    def inverse(u: torch.Tensor) -> torch.Tensor:
        d = ratio_denominators(u, floor)
        return torch.where(d > 0, 1.0 / d, torch.zeros_like(d))

    index = torch.from_numpy(rows)
    out = np.zeros((n, len(per_image)), dtype=np.float32)
    for s, a in enumerate(per_image):
        a = a.float()
        top = torch.topk(a[index], 2, dim=0)  # per channel the largest two and whose they are
        # an image that holds no channel's maximum sees the same maxima as a new image
        out[:, s] = (a * inverse(top.values[0])).amax(dim=1).numpy()
        for j in torch.unique(top.indices[0]).tolist():
            others = torch.where(top.indices[0] == j, top.values[1], top.values[0])
            out[rows[j], s] = float((a[rows[j]] * inverse(others)).max())
    return out


class RangeNetwork(nn.Module):
    """The original network returning (logits [N, K], activation ratios [N, S])."""

    def __init__(self, net: BoundedNetwork, maxima: list[torch.Tensor]) -> None:
        super().__init__()
        if len(maxima) != len(net.sites):
            raise CalibrationError(f"{len(maxima)} clean maxima for {len(net.sites)} bound sites")
        gm: fx.GraphModule = copy.deepcopy(net.net)
        graph = gm.graph
        calls = {n.target: n for n in graph.nodes if n.op == "call_module"}
        ratios = []
        for site, u in zip(net.sites, maxima, strict=True):
            node = calls[site.name]
            activation = node.args[0]
            gm.add_submodule(f"ratio_{site.name}", SiteRatio(u))
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
        return torch.cat([self(x[i : i + batch_size])[1] for i in range(0, len(x), batch_size)])
