"""The bounded network (SPEC section 1), the pixel-space normaliser and margin ascent."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from calibrate.ascent import AscentSettings, margins, maximize_margins, random_starts
from calibrate.bounded import BoundedNetwork, ChannelBound, Normalized
from calibrate.errors import CalibrationError
from guard.mmdf import masked_margin

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ---------------------------------------------------------------------------------------------
# (a) a two-layer network with hand-set weights


def _two_layer() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
        net[0].bias.copy_(torch.tensor([0.0, 0.5, -1.0]))
        net[2].weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [2.0, -1.0, 3.0]]))
        net[2].bias.copy_(torch.tensor([0.0, 1.0]))
    return net.eval()


# x1 = [2, 3]: z = W1 x + b1 = [2, 3.5, -2] -> ReLU [2, 3.5, 0]
#   original g = [2 + 3.5 + 0, 4 - 3.5 + 0 + 1] = [5.5, 1.5]
# x2 = [4, 1]: z = [4, 1.5, 2] -> ReLU [4, 1.5, 2]
#   original g = [4 + 1.5 + 2, 8 - 1.5 + 6 + 1] = [7.5, 13.5]
X = torch.tensor([[2.0, 3.0], [4.0, 1.0]])


def _set_bounds(bn: BoundedNetwork, values: list[float]) -> None:
    (b,) = bn.bounds()
    with torch.no_grad():
        b.copy_(torch.tensor(values))


def test_two_layer_sites_and_identity_at_inf() -> None:
    net = _two_layer()
    bn = BoundedNetwork(net, X)
    assert len(bn.sites) == 1
    site = bn.sites[0]
    assert site.kind == "linear" and site.channels == 3
    # a fresh bounded network has +inf bounds: the original logits
    with torch.no_grad():
        torch.testing.assert_close(bn(X), torch.tensor([[5.5, 1.5], [7.5, 13.5]]))


def test_two_layer_hand_set_bounds() -> None:
    bn = BoundedNetwork(_two_layer(), X)
    _set_bounds(bn, [0.5, 10.0, 0.0])
    # x1: min([2, 3.5, 0], [0.5, 10, 0]) = [0.5, 3.5, 0] -> [0.5 + 3.5, 1 - 3.5 + 1] = [4, -1.5]
    # x2: min([4, 1.5, 2], [0.5, 10, 0]) = [0.5, 1.5, 0] -> [0.5 + 1.5, 1 - 1.5 + 1] = [2, 0.5]
    with torch.no_grad():
        out = bn(X)
    torch.testing.assert_close(out, torch.tensor([[4.0, -1.5], [2.0, 0.5]]))


def test_two_layer_init_max() -> None:
    net = _two_layer()
    bn = BoundedNetwork(net, X)
    bn.init_bounds("max", X)
    # per-neuron max of ReLU(W1 x + b1) over X: max([2, 3.5, 0], [4, 1.5, 2]) = [4, 3.5, 2]
    torch.testing.assert_close(bn.bounds()[0].detach(), torch.tensor([4.0, 3.5, 2.0]))
    with torch.no_grad():
        assert torch.equal(bn(X), net(X))
        # outside X the bounds bite: x3 = [10, 0]: ReLU(z) = [10, 0.5, 9] -> min = [4, 0.5, 2]
        # -> [4 + 0.5 + 2, 8 - 0.5 + 6 + 1] = [6.5, 14.5]  (original [19.5, 47.5])
        x3 = torch.tensor([[10.0, 0.0]])
        torch.testing.assert_close(bn(x3), torch.tensor([[6.5, 14.5]]))
        torch.testing.assert_close(net(x3), torch.tensor([[19.5, 47.5]]))


def test_two_layer_init_constant() -> None:
    bn = BoundedNetwork(_two_layer(), X)
    bn.init_bounds(1.0, X)
    torch.testing.assert_close(bn.bounds()[0].detach(), torch.ones(3))
    # x1: min([2, 3.5, 0], 1) = [1, 1, 0] -> [2, 2 - 1 + 1] = [2, 2]
    with torch.no_grad():
        torch.testing.assert_close(bn(X[:1]), torch.tensor([[2.0, 2.0]]))


def test_init_max_resets_previous_bounds() -> None:
    bn = BoundedNetwork(_two_layer(), X)
    _set_bounds(bn, [0.1, 0.1, 0.1])  # would cap the recorded maxima if not reset to +inf first
    bn.init_bounds("max", X, batch_size=1)  # batching must still take the max over all of X
    torch.testing.assert_close(bn.bounds()[0].detach(), torch.tensor([4.0, 3.5, 2.0]))


def test_ceiling_keeps_bounds_at_or_below_the_clean_maximum() -> None:
    bn = BoundedNetwork(_two_layer(), X)
    bn.init_bounds("max", X, ceiling=True)  # per-neuron max over X: [4, 3.5, 2]
    _set_bounds(bn, [5.0, 1.0, -1.0])  # the first above its ceiling, the last below 0
    bn.clamp_()
    torch.testing.assert_close(bn.bounds()[0].detach(), torch.tensor([4.0, 1.0, 0.0]))


def test_ceiling_with_a_constant_init_caps_it_at_once() -> None:
    bn = BoundedNetwork(_two_layer(), X)
    bn.init_bounds(3.0, X, ceiling=True)  # ceiling [4, 3.5, 2]: 3.0 stays, 3.0 stays, 2.0
    torch.testing.assert_close(bn.bounds()[0].detach(), torch.tensor([3.0, 3.0, 2.0]))


def test_no_ceiling_by_default_and_init_resets_it() -> None:
    bn = BoundedNetwork(_two_layer(), X)
    bn.init_bounds("max", X, ceiling=True)
    bn.init_bounds("max", X)  # no ceiling this time: a bound may rise above the maximum
    _set_bounds(bn, [5.0, 1.0, 2.0])
    bn.clamp_()
    torch.testing.assert_close(bn.bounds()[0].detach(), torch.tensor([5.0, 1.0, 2.0]))


def test_clamp_keeps_bounds_nonnegative() -> None:
    bn = BoundedNetwork(_two_layer(), X)
    _set_bounds(bn, [-1.0, 2.0, -0.5])
    bn.clamp_()
    torch.testing.assert_close(bn.bounds()[0].detach(), torch.tensor([0.0, 2.0, 0.0]))
    # x1: min([2, 3.5, 0], [0, 2, 0]) = [0, 2, 0] -> [2, -2 + 1] = [2, -1]
    with torch.no_grad():
        torch.testing.assert_close(bn(X[:1]), torch.tensor([[2.0, -1.0]]))


def test_only_bounds_require_grad() -> None:
    net = _two_layer()
    bn = BoundedNetwork(net, X)
    trainable = [n for n, p in bn.named_parameters() if p.requires_grad]
    assert trainable == [f"net.{bn.sites[0].name}.bound"]
    assert not any(p.requires_grad for p in net.parameters())
    _set_bounds(bn, [0.5, 10.0, 1.0])
    bn(X[:1]).sum().backward()
    # d(g_0 + g_1)/d b_j = (W2[0, j] + W2[1, j]) where neuron j is clipped (ReLU > b_j), else 0.
    # x1: ReLU = [2, 3.5, 0] vs b = [0.5, 10, 1]: only neuron 0 clipped -> [1 + 2, 0, 0] = [3, 0, 0]
    torch.testing.assert_close(bn.bounds()[0].grad, torch.tensor([3.0, 0.0, 0.0]))
    assert all(p.grad is None for p in net.parameters())


def test_bounded_network_is_in_eval_mode() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))
    net.train()
    bn = BoundedNetwork(net, X)
    assert not any(m.training for m in bn.modules() if isinstance(m, nn.BatchNorm1d))


# ---------------------------------------------------------------------------------------------
# (b) every ReLU-type call site gets its own bound


class ManyRelus(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 5, 3, padding=1)
        self.c3 = nn.Conv2d(5, 6, 3, padding=1)
        self.c4 = nn.Conv2d(6, 7, 1)
        self.c5 = nn.Conv2d(7, 8, 1)
        self.c6 = nn.Conv2d(8, 9, 1)
        self.act = nn.ReLU()  # called twice
        self.inplace = nn.ReLU(inplace=True)
        self.r6 = nn.ReLU6()
        self.fc1 = nn.Linear(9, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.c1(x))  # site 0: conv, 4 channels (nn.ReLU, 1st call)
        x = F.relu(self.c2(x))  # site 1: conv, 5
        x = self.act(self.c3(x))  # site 2: conv, 6 (nn.ReLU, 2nd call)
        x = torch.relu(self.c4(x))  # site 3: conv, 7
        x = self.inplace(self.c5(x))  # site 4: conv, 8
        x = self.r6(self.c6(x))  # site 5: conv, 9
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        x = self.fc1(x).relu()  # site 6: linear, 10
        return self.fc2(x)  # logits: never bounded


def test_every_call_site_is_bounded() -> None:
    torch.manual_seed(0)
    model = ManyRelus().eval()
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    bn = BoundedNetwork(model, x)
    assert [s.channels for s in bn.sites] == [4, 5, 6, 7, 8, 9, 10]
    assert [s.kind for s in bn.sites] == ["conv"] * 6 + ["linear"]
    assert [tuple(b.shape) for b in bn.bounds()] == [(c,) for c in [4, 5, 6, 7, 8, 9, 10]]
    assert len({s.name for s in bn.sites}) == 7
    # the reused nn.ReLU module gets two separate bounds, one per call
    assert [s.follows for s in bn.sites if s.follows.startswith("act")] == ["act", "act_1"]
    with torch.no_grad():
        assert torch.equal(bn(x), ref)  # +inf bounds: exactly the original


def test_each_site_bound_acts_on_its_own_call() -> None:
    torch.manual_seed(0)
    model = ManyRelus().eval()
    x = torch.rand(3, 3, 8, 8)
    bn = BoundedNetwork(model, x)
    bn.init_bounds("max", x)
    with torch.no_grad():
        base = bn(x)
        assert torch.equal(base, model(x))
        changed = []
        for b in bn.bounds():
            saved = b.clone()
            b.zero_()
            changed.append(not torch.equal(bn(x), base))
            b.copy_(saved)
    # zeroing any one bound vector changes the output: each inserted bound is live
    assert all(changed)


def test_relu_feeding_the_output_is_not_bounded() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU())
    bn = BoundedNetwork(model, torch.rand(2, 4))
    assert [s.channels for s in bn.sites] == [5]


class UnassignedInplace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y.relu_()  # in place, result not assigned: later uses read `y`, the conv node
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_unassigned_inplace_relu_bound_is_live() -> None:
    torch.manual_seed(0)
    model = UnassignedInplace().eval()
    x = torch.rand(2, 3, 6, 6)
    bn = BoundedNetwork(model, x)
    assert len(bn.sites) == 1
    bn.init_bounds(0.0, x)  # all activations clipped to 0 -> logits = fc bias
    with torch.no_grad():
        torch.testing.assert_close(bn(x), model.fc.bias.expand(2, 2))


# ---------------------------------------------------------------------------------------------
# (c) torchvision models and a plain MLP


@functools.cache
def _torchvision(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, BoundedNetwork]:
    """Built once per module (tests re-initialise the bounds before using them)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    return model, x, ref, BoundedNetwork(model, x)


@pytest.mark.parametrize(
    ("name", "sites"),
    [
        ("resnet18", 17),  # stem + 2 per BasicBlock x 8
        ("resnet50", 49),  # stem + 3 per Bottleneck x 16
        ("vgg11_bn", 10),  # 8 conv + 2 classifier
        ("mobilenet_v2", 35),  # ReLU6: stem + 1 + 2 x 16 + final 1x1 conv
    ],
)
def test_torchvision_site_counts_and_identity_after_max_init(name: str, sites: int) -> None:
    _, x, ref, bn = _torchvision(name)
    assert len(bn.sites) == sites
    expected_kinds = {"conv", "linear"} if name.startswith("vgg") else {"conv"}
    assert {s.kind for s in bn.sites} == expected_kinds
    bn.init_bounds("max", x)
    assert all(bool((b >= 0).all()) and bool(torch.isfinite(b).all()) for b in bn.bounds())
    with torch.no_grad():
        assert torch.equal(bn(x), ref)


def test_resnet18_channels_and_bounds_bite() -> None:
    _, x, ref, bn = _torchvision("resnet18")
    # stem 64, then per stage two blocks x two sites of 64, 128, 256, 512 channels
    assert [s.channels for s in bn.sites] == [64] + [64] * 4 + [128] * 4 + [256] * 4 + [512] * 4
    bn.init_bounds("max", x)
    with torch.no_grad():
        for b in bn.bounds():
            b.mul_(0.5)
        assert not torch.allclose(bn(x), ref)


def test_mlp_per_neuron_bounds() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)
    ).eval()
    x = torch.rand(5, 3, 2, 2)
    bn = BoundedNetwork(mlp, x)
    assert [(s.kind, s.channels) for s in bn.sites] == [("linear", 16), ("linear", 8)]
    bn.init_bounds("max", x)
    w1, b1, w2, b2, w3, b3 = (p.detach() for p in mlp.parameters())
    h1 = torch.relu(x.flatten(1) @ w1.T + b1)
    torch.testing.assert_close(bn.bounds()[0].detach(), h1.amax(dim=0))
    # per-neuron semantics: a different bound for every neuron, each clipping only its own unit
    c1 = torch.linspace(0.0, 0.3, 16)
    c2 = torch.linspace(0.05, 0.2, 8)
    with torch.no_grad():
        bn.bounds()[0].copy_(c1)
        bn.bounds()[1].copy_(c2)
        z1 = torch.minimum(h1, c1)
        z2 = torch.minimum(torch.relu(z1 @ w2.T + b2), c2)
        torch.testing.assert_close(bn(x), z2 @ w3.T + b3)


# ---------------------------------------------------------------------------------------------
# (d) errors


def test_no_relu_is_an_error() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2))
    with pytest.raises(CalibrationError, match="ReLU"):
        BoundedNetwork(model, torch.rand(1, 2))


def test_only_output_relu_is_an_error() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    with pytest.raises(CalibrationError, match="ReLU"):
        BoundedNetwork(model, torch.rand(1, 2))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return torch.relu(self.fc(x))
        return self.fc(x)


def test_untraceable_model_is_a_calibration_error() -> None:
    with pytest.raises(CalibrationError, match=r"torch\.fx"):
        BoundedNetwork(DataDependent(), torch.rand(1, 2))


def test_channel_bound_records_max() -> None:
    cb = ChannelBound(2)
    cb.recording = True
    a = torch.tensor([[[[1.0, 5.0]], [[2.0, 0.5]]], [[[3.0, 0.0]], [[0.0, 7.0]]]])  # [2, 2, 1, 2]
    out = cb(a)
    # channel 0 sees {1, 5, 3, 0} -> 5; channel 1 sees {2, 0.5, 0, 7} -> 7
    torch.testing.assert_close(cb.observed_max, torch.tensor([5.0, 7.0]))
    assert torch.equal(out, a)


# ---------------------------------------------------------------------------------------------
# (e) Normalized


def test_normalized_by_hand() -> None:
    norm = Normalized(nn.Identity(), mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    x = torch.full((1, 3, 2, 2), 0.1)
    # (0.1 - 0.5) / 0.2 = -2;  (0.1 - 0.4) / 0.25 = -1.2;  (0.1 - 0.3) / 0.3 = -0.6667
    expected = torch.tensor([-2.0, -1.2, -2.0 / 3.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    torch.testing.assert_close(norm(x), expected)


def test_normalized_wraps_a_model_and_traces() -> None:
    torch.manual_seed(0)
    model = ManyRelus().eval()
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    norm = Normalized(model, mean, std).eval()
    x = torch.rand(2, 3, 8, 8)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), model((x - m) / s))
        bn = BoundedNetwork(norm, x)
        assert len(bn.sites) == 7
        assert torch.equal(bn(x), norm(x))


@pytest.mark.parametrize(
    ("mean", "std"),
    [([0.5, 0.5, 0.5], [0.2, 0.0, 0.2]), ([0.5, 0.5, 0.5], [0.2, -0.1, 0.2]), ([0.5], [0.2, 0.2])],
)
def test_normalized_rejects_bad_std(mean: list[float], std: list[float]) -> None:
    with pytest.raises(CalibrationError):
        Normalized(nn.Identity(), mean, std)


# ---------------------------------------------------------------------------------------------
# (f) ascent


def test_torch_margins_match_numpy_masked_margin() -> None:
    rng = np.random.default_rng(0)
    g = rng.normal(size=(50, 7)) * 5
    g[0] = [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # a tie at the top
    g[1] = -5000.0 + np.arange(7)  # large negative logits
    k = rng.integers(0, 7, size=50)
    k[0], k[1] = 0, 6
    out = margins(torch.from_numpy(g), torch.from_numpy(k))
    np.testing.assert_allclose(out.numpy(), masked_margin(g, k), rtol=0, atol=1e-12)
    # hand: row0 k=0 -> 1 - 1 = 0;  row1 k=6 -> -4994 - (-4995) = 1
    assert out[0].item() == 0.0 and out[1].item() == 1.0


def test_torch_margins_two_classes() -> None:
    out = margins(torch.tensor([[0.5, -1.5], [0.5, -1.5]]), torch.tensor([0, 1]))
    torch.testing.assert_close(out, torch.tensor([2.0, -2.0]))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_maximize_margins_increases_margin_and_stays_in_box(optimizer: str) -> None:
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    for p in net.parameters():
        p.requires_grad_(False)
    x0, k = random_starts(3, 2, (4,), torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = margins(net(x0), k)
    steps = []
    x, final = maximize_margins(
        net, x0, k, AscentSettings(steps=25, lr=0.05, optimizer=optimizer), lambda: steps.append(1)
    )
    assert len(steps) == 25
    assert final.mean() > before.mean() + 1e-3
    assert bool(((x >= 0) & (x <= 1)).all())
    assert not x.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(final, margins(net(x), k))
    assert torch.equal(x0, random_starts(3, 2, (4,), torch.Generator().manual_seed(1))[0])


def test_maximize_margins_early_stop() -> None:
    torch.manual_seed(0)
    # K = 2 and a linear net: each margin is linear in x, so steps of 0.5 per pixel reach the
    # maximising corner of the box within 2 steps; the summed margin then stops changing and
    # rel_tol ends the ascent after a few steps instead of 200
    net = nn.Linear(4, 2).requires_grad_(False)
    x0, k = random_starts(2, 2, (4,), torch.Generator().manual_seed(1))
    steps = []
    x, final = maximize_margins(
        net, x0, k, AscentSettings(steps=200, lr=0.5, rel_tol=1e-6), lambda: steps.append(1)
    )
    assert 1 < len(steps) <= 6
    # the corner: x_i = 1 where (w_k - w_other)_i > 0, else 0
    w = net.weight
    direction = torch.stack([w[0] - w[1], w[1] - w[0]])[k]
    assert torch.equal(x, (direction > 0).float())
    b = net.bias
    expected = ((direction > 0).float() * direction).sum(1) + torch.stack(
        [b[0] - b[1], b[1] - b[0]]
    )[k]
    torch.testing.assert_close(final, expected)
    # without rel_tol every step runs
    steps.clear()
    maximize_margins(net, x0, k, AscentSettings(steps=30, lr=0.5), lambda: steps.append(1))
    assert len(steps) == 30


class _TwoSpeeds(nn.Module):
    """Logits (1e6 a, 0, 10 b - 5) of points (a, b): from (1, 0) class 0's margin is 1e6 and
    stays there; from (0, 0) class 2's margin climbs from -5 by about 10 lr a step to 5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([1e6 * x[:, 0], torch.zeros_like(x[:, 0]), 10 * x[:, 1] - 5], dim=1)


def test_maximize_margins_stops_each_class_on_its_own() -> None:
    x0 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    k = torch.tensor([0, 0, 2, 2])
    steps: list[int] = []
    settings = AscentSettings(steps=1000, lr=0.005, rel_tol=1e-5)
    x, final = maximize_margins(_TwoSpeeds(), x0, k, settings, lambda: steps.append(1))
    # class 0 is settled at once; its 2e6 would end a rule on the batch's summed margin (a
    # change of 0.1 in 2e6) at the second step, while class 2 climbs for ~200 steps at lr 0.005
    assert 150 < len(steps) < 400
    torch.testing.assert_close(final[:2], torch.full((2,), 1e6))
    torch.testing.assert_close(final[2:], torch.full((2,), 5.0), rtol=0, atol=0.05)
    torch.testing.assert_close(x[:2], x0[:2], rtol=0, atol=0)  # left where they settled


class _BatchSizes(nn.Module):
    """Wraps a network and records the batch size of every call."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        return self.net(x)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_maximize_margins_in_chunks_gives_the_one_batch_result(optimizer: str) -> None:
    # a small CNN with BatchNorm in eval mode; with rel_tol, classes settle at different steps,
    # so later steps ascend a subset of the rows, which the chunks must split as well
    torch.manual_seed(3)
    cnn = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval().requires_grad_(False)  # fmt: skip
    x0, k = random_starts(5, 7, (3, 8, 8), torch.Generator().manual_seed(2))
    settings = AscentSettings(steps=60, lr=0.05, optimizer=optimizer, rel_tol=1e-3)
    whole_steps: list[int] = []
    x1, m1 = maximize_margins(cnn, x0, k, settings, lambda: whole_steps.append(1))
    assert 1 < len(whole_steps) <= 60
    counted = _BatchSizes(cnn)
    chunk_steps: list[int] = []
    x2, m2 = maximize_margins(counted, x0, k, settings, lambda: chunk_steps.append(1), 4)
    assert len(chunk_steps) == len(whole_steps)
    assert max(counted.sizes) == 4
    assert sum(counted.sizes) > 35 * len(chunk_steps) / 2  # every step ran, in chunks
    torch.testing.assert_close(x2, x1, rtol=0, atol=1e-5)
    torch.testing.assert_close(m2, m1, rtol=1e-5, atol=1e-5)
    assert not torch.equal(x1, x0)


def test_maximize_margins_rejects_a_chunk_below_one() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        maximize_margins(nn.Linear(2, 2), torch.zeros(2, 2), torch.tensor([0, 1]),
                         AscentSettings(steps=1, lr=0.1), batch_size=0)  # fmt: skip


def test_random_starts_shape_and_order() -> None:
    x, k = random_starts(3, 2, (1, 4, 4), torch.Generator().manual_seed(0))
    assert x.shape == (6, 1, 4, 4)
    assert k.tolist() == [0, 0, 1, 1, 2, 2]
    assert bool(((x >= 0) & (x < 1)).all())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": -1, "lr": 0.1},
        {"steps": 10, "lr": 0.0},
        {"steps": 10, "lr": -0.1},
        {"steps": 10, "lr": 0.1, "optimizer": "rmsprop"},
    ],
)
def test_ascent_settings_reject(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        AscentSettings(**kwargs)


# ---------------------------------------------------------------------------------------------
# a network without ReLU: its other activations are bounded, where dim 1 is the channel axis


class SiluNet(nn.Module):
    """EfficientNet-like: SiLU after convolutions and after a hidden linear layer, a GELU too,
    and a sigmoid gate (not an activation to bound)."""

    def __init__(self, relu_too: bool = False) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)
        self.act = nn.SiLU()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)
        self.relu_too = relu_too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.c1(x))  # site: conv, 4
        x = F.gelu(self.c2(x)) * torch.sigmoid(x.mean(1, keepdim=True))  # site: conv, 5
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        h = self.fc1(x)
        h = torch.relu(h) if self.relu_too else F.silu(h)  # site: linear, 6
        return self.fc2(h)


def test_a_network_without_relu_bounds_its_other_activations() -> None:
    torch.manual_seed(0)
    model = SiluNet().eval()
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    bn = BoundedNetwork(model, x)
    assert bn.activation_kind == "other"
    assert [(s.kind, s.channels) for s in bn.sites] == [("conv", 4), ("conv", 5), ("linear", 6)]
    with torch.no_grad():
        assert torch.equal(bn(x), ref)  # +inf bounds: exactly the original
        bn.init_bounds("max", x)
        assert torch.equal(bn(x), ref)  # at the clean maxima: still the original on them
        for b in bn.bounds():
            b.mul_(0.5)
        assert not torch.allclose(bn(x), ref)  # and the bounds bite
    # with any ReLU in the network, SPEC 1 holds: only the ReLU sites are bounded
    mixed = BoundedNetwork(SiluNet(relu_too=True).eval(), x)
    assert mixed.activation_kind == "relu" and [s.channels for s in mixed.sites] == [6]


class ChannelsLast(nn.Module):
    """ConvNeXt-style: a GELU between Linear layers on a channels-last map, and a transformer's
    tokens [N, T, C]: no activation there has its channels on dim 1."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 2, stride=2)
        self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).permute(0, 2, 3, 1)  # [N, H, W, C]
        x = self.down(F.gelu(self.up(x)))
        tokens = x.flatten(1, 2)  # [N, T, C]
        tokens = F.gelu(tokens)
        return self.head(tokens.mean(1))


def test_activations_with_their_channels_last_are_refused_by_name() -> None:
    with pytest.raises(CalibrationError, match=r"no activation to bound.*channels-first"):
        BoundedNetwork(ChannelsLast().eval(), torch.rand(2, 3, 8, 8))
