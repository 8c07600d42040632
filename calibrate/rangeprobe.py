"""The range detector's network: the original network with one more output, per bound site the
largest activation relative to its channel's clean scale (`clean_scales`: about the 99th
percentile of the channel's per-image maxima over the correctly classified clean images). By
default (`--range-scales both`) each site gives two ratios: against the scales over all classes,
and against those of the class the network predicts (`--range-scales class` alone): a
backdoored input classified as the target carries activations that the target's own clean
images do not reach, even where some other class's do.

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
CLASS_FLOOR = 0.5
"""With class-conditional scales (`--range-scales class`, or `both`, the default), an image
predicted as class c is measured against each channel's clean scale over the class-c images, but
never against less than this fraction of the channel's scale over all classes: a channel a class
barely uses would otherwise turn an ordinary activation into a huge ratio and give the clean
statistic a heavy tail. A throwaway probe on the CIFAR-10 benchmark models (scales over the 500
calibration images; triggered inputs flagged at a matched 0.5% clean rate on the 9,000
evaluation images), class scales alone with a floor of 0.5 / 0.75 against the scales over all
classes: WaNet 73.4 / 67.6% (60.2%), WaNet trained 24 epochs 80.3 / 67.0% (77.1%), poisoned
per batch 83.5 / 75.5% (75.8%), full width 99.0 / 98.2% (92.2%), but the chessboard 10.6 /
40.2% (81.3%); with no floor the chessboard fell to 0.04%. Hence `both` (`balance`)."""
BALANCE_QUANTILE = 0.95
"""With both kinds of scales (`--range-scales both`, the default), the class-conditional
ratios are multiplied by the `balance` that puts their clean statistics' 95th percentile on
that of the ratios over all classes, so that the largest of the two is not always the class
one's (whose clean tail is the heavier). The same probe, the larger of the two with the class
ratios rescaled at the 50th / 90th / 95th / 99th percentile: the chessboard 55.6 / 58.3 / 62.5 /
64.3%, WaNet 73.0 / 72.4 / 72.1 / 72.1%, full-width WaNet 98.4 / 98.5 / 98.6 / 98.7%: flat in
the quantile; 95 leaves 25 of 500 clean statistics above it."""
MIN_CLASS_IMAGES = 2
"""A class gets scales of its own from this many correctly classified clean images on; with
fewer, its images are measured against the scales over all classes."""


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
    return _inverse(ratio_denominators(clean_scale, floor))


def class_denominators(
    global_scale: torch.Tensor, class_scale: torch.Tensor, floor: float = RANGE_FLOOR
) -> torch.Tensor:
    """A channel's denominator for the images of one class: the class's own clean scale, but at
    least `CLASS_FLOOR` times the channel's floored scale over all classes
    (`ratio_denominators`); 0 where that is 0 (a channel never active on any clean image)."""
    return _class_floored(ratio_denominators(global_scale, floor), class_scale.float())


def _class_floored(d: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """`own` (a class's clean scales), at least `CLASS_FLOOR` times the denominators `d` over
    all classes; 0 where `d` is 0."""
    return torch.where(d > 0, torch.maximum(own, CLASS_FLOOR * d), d)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d > 0, 1.0 / d.clamp(min=1e-30), torch.zeros_like(d))


def channel_maxima(a: torch.Tensor) -> torch.Tensor:
    """[N, C, ...] -> [N, C]: each channel's largest value over the positions ([N, C] as is)."""
    positions = tuple(range(2, a.dim()))
    return a.amax(dim=positions) if positions else a


class ChannelMaxima(nn.Module):
    """`channel_maxima` as a module: the graph keeps [N, C] per site, not the activation, until
    the logits name the class whose scales the ratios use."""

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return channel_maxima(a)


def _as_inverse_rows(scales_or_rows: torch.Tensor) -> torch.Tensor:
    """Clean scales [C] as the one row [1, C] of their inverse floored denominators
    (`inverse_scales`); inverse-denominator rows [R, C] as they are."""
    t = scales_or_rows
    return inverse_scales(t)[None] if t.dim() == 1 else t


class SiteRatios(nn.Module):
    """(per site s the activation [N, C_s, ...] or its channel maxima [N, C_s], ..., class [N])
    -> [N, G x S]: for each of the G `groups` and each site, the largest over channels and
    positions of a / u, u the channel's denominator for the input's class (`class_denominators`;
    one row for all classes with `--range-scales global`: the floored clean scale,
    `ratio_denominators`). Columns group by group, sites in order within a group. A channel
    never active on the clean images counts 0: it has no clean range to leave, and the bounded
    network already holds it at 0.

    A group gives per site clean scales [C_s] or inverse-denominator rows [R, C_s]
    (`inverse_tables`; R = 1, or one row per class, looked up by `cls`, the predicted class).

    All sites are computed together: their channel maxima side by side [N, sum C_s], one
    lookup of the class's rows, one product, and one maximum over each site's channels through
    an index [S, max C_s] (a narrower site repeats its last channel, which leaves its maximum
    as it is). Site by site, the same ops cost about 7 kernels per site, each a launch on a
    GPU: on an H200 (onnxruntime 1.31, FP32, batch 1) a width-16 ResNet-18 took 1.45 ms with
    its ratios computed site by site and 0.73 ms with them computed together, against 0.47 ms
    without them."""

    def __init__(self, groups: Sequence[Sequence[torch.Tensor]]) -> None:
        super().__init__()
        if not groups or not groups[0]:
            raise ValueError("SiteRatios needs at least one group of at least one site")
        tables = [[_as_inverse_rows(t).float() for t in g] for g in groups]
        widths = [int(t.shape[1]) for t in tables[0]]
        for g in tables:
            if [int(t.shape[1]) for t in g] != widths:
                raise ValueError(f"every group needs sites of widths {widths}")
        rows = max(int(t.shape[0]) for g in tables for t in g)
        if any(int(t.shape[0]) not in (1, rows) for g in tables for t in g):
            raise ValueError("a site's rows must be 1 or one per class")
        side_by_side = [torch.cat([t.expand(rows, -1) for t in g], dim=1) for g in tables]
        self.inv_scale: torch.Tensor
        self.register_buffer("inv_scale", torch.stack(side_by_side, dim=1))  # [R, G, sum C]
        offsets = np.cumsum([0, *widths[:-1]])
        columns = [
            [int(o) + min(j, w - 1) for j in range(max(widths))]
            for o, w in zip(offsets, widths, strict=True)
        ]
        self.index: torch.Tensor
        self.register_buffer("index", torch.tensor(columns, dtype=torch.long))  # [S, max C]

    def forward(self, *maxima: torch.Tensor, cls: torch.Tensor | None = None) -> torch.Tensor:
        m = torch.cat([channel_maxima(a) for a in maxima], dim=1)  # [N, sum C]
        if self.inv_scale.shape[0] == 1:  # the same scales whatever the class
            inv = self.inv_scale[0]  # [G, sum C]
        else:
            if cls is None:
                raise ValueError("class-conditional range ratios need the predicted class")
            inv = self.inv_scale[cls]  # [N, G, sum C]
        product = m[:, None, :] * inv  # [N, G, sum C]
        return product[:, :, self.index].amax(dim=3).flatten(1)  # [N, G, S] -> [N, G x S]


class SiteRatio(SiteRatios):
    """`SiteRatios` of one site and one group: (activation [N, C, ...] or its channel maxima
    [N, C], class [N]) -> [N, 1], from clean scales [C] or inverse-denominator rows [R, C]."""

    def __init__(
        self, clean_scale: torch.Tensor | None = None, *, inverse: torch.Tensor | None = None
    ) -> None:
        if (clean_scale is None) == (inverse is None):
            raise ValueError("give SiteRatio clean scales or inverse-denominator rows, not both")
        if clean_scale is not None and clean_scale.dim() != 1:
            raise ValueError(f"clean scales must be [C], got {tuple(clean_scale.shape)}")
        if inverse is not None and inverse.dim() != 2:
            raise ValueError(f"inverse-denominator rows must be [R, C], got {tuple(inverse.shape)}")
        table = clean_scale if clean_scale is not None else inverse
        assert table is not None
        super().__init__([[table]])

    def forward(  # type: ignore[override]
        self, a: torch.Tensor, cls: torch.Tensor | None = None
    ) -> torch.Tensor:
        return super().forward(a, cls=cls)


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


def classes_with_own_scales(inside: np.ndarray, classes: np.ndarray, num_classes: int) -> list[int]:
    """The classes with at least `MIN_CLASS_IMAGES` `inside` images (`classes`: each image's
    class as the network predicts it; inside, it is also the true one): those that get clean
    scales of their own."""
    counts = np.bincount(classes[inside], minlength=num_classes)
    return [c for c in range(num_classes) if counts[c] >= MIN_CLASS_IMAGES]


def class_scales(
    per_image: Sequence[torch.Tensor], inside: np.ndarray, classes: np.ndarray, num_classes: int
) -> list[list[torch.Tensor] | None]:
    """Per class: per site [C], the clean scales (`clean_scales`) over the `inside` images of
    that class, or None for a class without scales of its own (`classes_with_own_scales`)."""
    own = set(classes_with_own_scales(inside, classes, num_classes))
    return [
        clean_scales(per_image, inside & (classes == c)) if c in own else None
        for c in range(num_classes)
    ]


def inverse_tables(
    per_image: Sequence[torch.Tensor],
    inside: np.ndarray,
    classes: np.ndarray | None = None,
    num_classes: int = 0,
    floor: float = RANGE_FLOOR,
) -> list[torch.Tensor]:
    """Per site the rows `SiteRatio` multiplies an image's channel maxima by: [1, C], the
    inverse floored clean scales over the `inside` images (`classes` None: the same scales for
    every class), or [num_classes, C], row c the inverse `class_denominators` of class c (the
    scales over all classes for a class with too few images of its own)."""
    scales = clean_scales(per_image, inside)
    if classes is None:
        return [inverse_scales(u, floor)[None] for u in scales]
    own = class_scales(per_image, inside, classes, num_classes)
    tables = []
    for s, u in enumerate(scales):
        rows = [
            ratio_denominators(u, floor) if c is None else class_denominators(u, c[s], floor)
            for c in own
        ]
        tables.append(_inverse(torch.stack(rows)))
    return tables


def balance(
    global_stats: np.ndarray, class_stats: np.ndarray, q: float = BALANCE_QUANTILE
) -> float:
    """What the class-conditional ratios are multiplied by beside the ratios over all classes:
    the q-quantile of the clean range statistics over all classes over that of the
    class-conditional ones (1 where either is 0)."""
    g, c = float(np.quantile(global_stats, q)), float(np.quantile(class_stats, q))
    return g / c if g > 0 and c > 0 else 1.0


def _scales_without_self(a: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """[N, C]: per image the clean scale (`clean_scales`) of each channel over the images
    `rows` other than itself. An image not among them sees the scale over all of them, as a new
    image does; one among them that scale over the other len(rows) - 1 (where it is among a
    channel's k largest, that channel's scale is the next one down). k is that of all of them."""
    n, channels = int(a.shape[0]), int(a.shape[1])
    k = scale_rank(int(rows.size))  # k <= len(rows) - 1 for len(rows) >= 2
    index = torch.from_numpy(rows)
    top = torch.topk(a[index], k + 1, dim=0)  # per channel the k + 1 largest, and whose
    among = torch.zeros(n, channels, dtype=torch.bool)
    among[index[top.indices[:k]], torch.arange(channels).expand(k, channels)] = True
    kth = torch.where(among, top.values[k], top.values[k - 1])  # of the others
    first = torch.zeros(n, channels, dtype=torch.bool)
    first[index[top.indices[0]], torch.arange(channels)] = True
    largest = torch.where(first, top.values[1], top.values[0])  # of the others
    return torch.where(kth > 0, kth, largest)


def leave_one_out_ratios(
    per_image: Sequence[torch.Tensor],
    inside: np.ndarray | None = None,
    classes: np.ndarray | None = None,
    floor: float = RANGE_FLOOR,
) -> np.ndarray:
    """[N, S]: per site, each image's largest ratio as `SiteRatio` computes a new image's, with
    the clean scales taken over the `inside` images (default: all) OTHER than itself. An image
    outside them is measured against all of them, as a new image is; one inside against the
    other N_in - 1. With `classes` (each image's predicted class), as `inverse_tables` builds
    the served rows: the scales of the image's class over the others of that class, floored at
    `CLASS_FLOOR` times those over all the others. A new clean image's ratios are distributed
    as one of these (exchangeability), so every clean image serves the null, none is spent on
    it. `per_image`: per site [N, C], as `per_image_maxima` returns."""
    n = int(per_image[0].shape[0]) if per_image else 0
    rows = np.arange(n) if inside is None else np.flatnonzero(inside)
    if inside is not None and len(inside) != n:
        raise CalibrationError(f"{len(inside)} inside flags for {n} images")
    if classes is not None and len(classes) != n:
        raise CalibrationError(f"{len(classes)} classes for {n} images")
    if rows.size < 2:
        raise CalibrationError(
            "the range detector's clean scales need at least 2 clean images the network "
            f"classifies correctly, got {rows.size}"
        )
    is_inside = np.zeros(n, dtype=bool)
    is_inside[rows] = True
    # a class without scales of its own keeps those over all classes, as served
    own_classes = (
        []
        if classes is None
        else classes_with_own_scales(is_inside, classes, int(classes.max()) + 1)
    )
    out = np.zeros((n, len(per_image)), dtype=np.float32)
    for s, a in enumerate(per_image):
        a = a.float()
        d = ratio_denominators(_scales_without_self(a, rows), floor)
        for c in own_classes:
            assert classes is not None
            members = np.flatnonzero(is_inside & (classes == c))
            sel = torch.from_numpy(classes == c)
            d[sel] = _class_floored(d[sel], _scales_without_self(a, members)[sel])
        out[:, s] = (a * _inverse(d)).amax(dim=1).numpy()
    return out


class RangeNetwork(nn.Module):
    """The original network returning (logits [N, K], activation ratios [N, G x S]). Each of
    the G `groups` holds per site the rows `SiteRatios` multiplies by (`inverse_tables`: [1, C],
    or [K, C] looked up by the predicted class, the argmax of the logits) or plain clean scales
    [C], and gives S columns, one per site, in that order."""

    def __init__(self, net: BoundedNetwork, *groups: Sequence[torch.Tensor]) -> None:
        super().__init__()
        if not groups:
            raise CalibrationError("the range network needs the clean scales of its sites")
        for tables in groups:
            if len(tables) != len(net.sites):
                raise CalibrationError(
                    f"{len(tables)} clean scales for {len(net.sites)} bound sites"
                )
        gm: fx.GraphModule = copy.deepcopy(net.net)
        device = device_of(gm)
        graph = gm.graph
        calls = {n.target: n for n in graph.nodes if n.op == "call_module"}
        maxima = []
        for site in net.sites:
            node = calls[site.name]
            activation = node.args[0]
            gm.add_submodule(f"maxima_{site.name}", ChannelMaxima())
            with graph.inserting_after(node):
                maxima.append(graph.call_module(f"maxima_{site.name}", (activation,)))
            node.replace_all_uses_with(activation)  # the original network: no bound
            graph.erase_node(node)
            gm.delete_submodule(site.name)
        output = next(n for n in graph.nodes if n.op == "output")
        logits = output.args[0]
        by_class = any(t.dim() == 2 and t.shape[0] > 1 for g in groups for t in g)
        gm.add_submodule("site_ratios", SiteRatios(groups).to(device))
        with graph.inserting_before(output):
            cls = graph.call_function(torch.argmax, (logits,), {"dim": 1}) if by_class else None
            stacked = graph.call_module("site_ratios", tuple(maxima), {"cls": cls})
        output.args = ((logits, stacked),)
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
