"""DINOHead: official keys, weight-norm semantics, deepcopy, FSDP2 and (optionally) official parity."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dinov2_core.models import DINOHead


def test_keys_shapes_and_param_count():
    head = DINOHead(1536, 131072, hidden_dim=2048, bottleneck_dim=384)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (2048, 1536), "mlp.0.bias": (2048,),
        "mlp.2.weight": (2048, 2048), "mlp.2.bias": (2048,),
        "mlp.4.weight": (384, 2048), "mlp.4.bias": (384,),
        "last_layer.weight_g": (131072, 1), "last_layer.weight_v": (131072, 384),
    }
    assert sum(p.numel() for p in head.parameters()) == 58_593_664
    assert torch.all(head.last_layer.weight_g == 1) and head.last_layer.weight_g.requires_grad
    assert {n for n, _ in head.named_parameters()} == set(shapes)  # DCP/FSDP FQNs == state-dict keys


def test_structure_variants():
    assert isinstance(DINOHead(8, 16, nlayers=1, bottleneck_dim=4).mlp, torch.nn.Linear)
    bn = DINOHead(8, 16, nlayers=3, hidden_dim=12, bottleneck_dim=4, use_bn=True)
    assert [type(m).__name__ for m in bn.mlp] == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]
    assert "mlp.0.bias" not in DINOHead(8, 16, hidden_dim=12, bottleneck_dim=4, mlp_bias=False).state_dict()


def test_forward_is_weight_normed_linear_of_normalised_bottleneck():
    torch.manual_seed(0)
    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    x = torch.randn(5, 16)
    z = F.normalize(head.mlp(x), dim=-1)
    v, g = head.last_layer.weight_v, head.last_layer.weight_g
    expected = z @ (g * v / v.norm(dim=1, keepdim=True)).T
    assert torch.allclose(head(x), expected, atol=1e-6)
    # scaling v does not change the output; g scales it
    with torch.no_grad():
        head.last_layer.weight_v.mul_(3.0)
    assert torch.allclose(head(x), expected, atol=1e-6)
    head(x).sum().backward()
    assert head.last_layer.weight_g.grad is not None and head.last_layer.weight_v.grad is not None


def test_deepcopy_gives_independent_equal_head():
    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8)
    head(torch.randn(2, 16)).sum().backward()
    twin = copy.deepcopy(head)
    x = torch.randn(3, 16)
    assert torch.equal(head(x), twin(x))
    with torch.no_grad():
        twin.last_layer.weight_g.mul_(2)
    assert not torch.equal(head(x), twin(x))


def test_fully_shard_single_process(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8)
        reference = copy.deepcopy(head)
        fully_shard(head)
        x = torch.randn(4, 16)
        out = head(x)
        assert torch.allclose(out, reference(x), atol=1e-6)
        out.sum().backward()
        reference(x).sum().backward()
        grad = head.last_layer.weight_g.grad
        assert torch.allclose(grad.full_tensor() if hasattr(grad, "full_tensor") else grad,
                              reference.last_layer.weight_g.grad, atol=1e-6)
        assert set(head.state_dict()) == set(reference.state_dict())
    finally:
        dist.destroy_process_group()


@pytest.mark.official
@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")
def test_official_dino_head_parity():
    official = pytest.importorskip("dinov2.layers")
    torch.manual_seed(0)
    theirs = official.DINOHead(48, 96, hidden_dim=64, bottleneck_dim=16)
    ours = DINOHead(48, 96, hidden_dim=64, bottleneck_dim=16)
    with torch.no_grad():
        theirs.last_layer.weight_g.uniform_(0.5, 2.0)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(7, 48, dtype=dtype)
        a, b = theirs.to(dtype)(x), ours.to(dtype)(x)
        assert (a - b).abs().max() <= (1e-6 if dtype == torch.float32 else 1e-12)
