import pytest
import torch

from torchdiffusion.nets import MLPConfig, MLPDenoiserNet, build_net



def test_shape_and_errors():
    net = MLPDenoiserNet(dim=3, hidden=64, num_blocks=2)
    x = torch.randn(5, 3)
    assert net(x, torch.rand(5)).shape == x.shape
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 3\), got \(5, 2\)"):
        net(torch.randn(5, 2), torch.rand(5))
    with pytest.raises(ValueError, match="num_classes=None"):
        net(x, torch.rand(5), class_labels=torch.zeros(5, dtype=torch.long))


def test_config_and_registry():
    cfg = MLPConfig(dim=2, hidden=32, num_blocks=1, time_embed_dim=16, num_classes=4)
    net = build_net("mlp", **cfg.__dict__)
    assert isinstance(net, MLPDenoiserNet) and net.config == cfg
    assert MLPDenoiserNet.from_config(cfg).config == cfg


def test_class_conditioning_and_null_class():
    torch.manual_seed(0)
    net = MLPDenoiserNet(dim=2, hidden=64, num_blocks=2, num_classes=3)
    torch.nn.init.normal_(net.out.weight, std=0.1)
    x, t = torch.randn(6, 2), torch.full((6,), 0.3)
    a = net(x, t, class_labels=torch.zeros(6, dtype=torch.long))
    b = net(x, t, class_labels=torch.ones(6, dtype=torch.long))
    assert (a - b).abs().amax(dim=1).min() > 1e-5
    assert torch.equal(net(x, t), net(x, t, class_labels=torch.full((6,), 3)))


def test_mlp_learns_noise_prediction():
    """A few hundred Adam steps of eps-prediction on a fixed 2-D Gaussian reduce the loss clearly."""
    torch.manual_seed(0)
    mean, scale = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.2])
    net = MLPDenoiserNet(dim=2, hidden=128, num_blocks=2)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    alpha_bar = torch.cos(torch.linspace(0, 1, 1000) * torch.pi / 2).clamp(min=1e-3) ** 2

    def loss_on(n, gen=None):
        x0 = mean + scale * torch.randn(n, 2, generator=gen)
        t = torch.randint(0, 1000, (n,), generator=gen)
        eps = torch.randn(n, 2, generator=gen)
        a = alpha_bar[t][:, None]
        return (net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t.float()) - eps).pow(2).mean()

    with torch.no_grad():
        before = loss_on(4096, torch.Generator().manual_seed(1)).item()
    for _ in range(300):
        opt.zero_grad()
        loss_on(256).backward()
        opt.step()
    with torch.no_grad():
        after = loss_on(4096, torch.Generator().manual_seed(1)).item()
    assert before > 0.9  # the zero-initialised output predicts 0: loss = mean(eps^2) = 1
    assert after < 0.6 * before, (before, after)
