"""discriminator.py: zero-initialised branches leave the teacher's features unchanged at step 0; every switch works."""
import pytest
import torch

import model
from discriminator import Discriminator


def teacher(name="tiny-sd1"):
    torch.manual_seed(0)
    return model.UNet(model.UNET_PRESETS[name]).eval()


def inputs(cfg, b=2):
    g = torch.Generator().manual_seed(3)
    x, z = torch.randn(b, 4, 16, 16, generator=g), torch.randn(b, 4, 16, 16, generator=g)
    ctx = torch.randn(b, 5, cfg.context_dim, generator=g)
    extra = {}
    if cfg.add_time_dim:
        extra = dict(pooled=torch.randn(b, cfg.add_in_dim - 6 * cfg.add_time_dim, generator=g),
                     time_ids=torch.tensor([[16.0, 16, 0, 0, 16, 16]] * b))
    return x, z, ctx, extra


def unzero(D):
    """D's heads and new branches start at zero, which blocks gradients through them: give those convs a value."""
    with torch.no_grad():
        for p in D.parameters():
            if p.abs().sum() == 0 and p.dim() == 4:
                p.normal_(0, 0.1)


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sdxl"])
def test_step0_features_equal_teacher(name):
    """With z conditioning and multiscale input on, D's last decoder features equal the teacher UNet's at t_D."""
    T = teacher(name)
    D = Discriminator(T, t_D=0).eval()
    x, z, ctx, extra = inputs(T.cfg)
    feats = {}
    T.conv_norm_out.register_forward_hook(lambda m, i, o: feats.__setitem__("teacher", i[0]))
    D.out_head[0].register_forward_hook(lambda m, i, o: feats.__setitem__("D", i[0]))
    with torch.no_grad():
        T(x, torch.tensor(0), ctx, **extra)  # the same scalar timestep D uses
        D(x, z, ctx, **extra)
    assert torch.equal(feats["D"], feats["teacher"])
    # and the new branches do change them once they are no longer zero
    with torch.no_grad():
        D.z_conv.weight.normal_()
        D(x, z, ctx, **extra)
    assert not torch.allclose(feats["D"], feats["teacher"])


def test_heads_and_switches():
    T = teacher()
    cfg = T.cfg
    x, z, ctx, _ = inputs(cfg)
    full = Discriminator(T)
    n_heads = 3 * len(cfg.channels) * (cfg.layers_per_block + 1) + 1
    out = full(x, z, ctx)
    assert len(out) == n_heads and all(o.shape[:2] == (2, 1) for o in out)
    assert {o.shape[-1] for o in out} == {16, 8}  # every decoder scale of the tiny model is judged
    plain = Discriminator(T, z_cond=False, ms_input=False, ms_output=False)
    assert plain.z_conv is None and plain.x_convs is None and len(plain(x, z, ctx)) == 1
    scratch = Discriminator(T, init="scratch")
    assert not torch.equal(scratch.unet.conv_in.weight, T.conv_in.weight)
    assert torch.equal(full.unet.conv_in.weight, T.conv_in.weight)
    with pytest.raises(ValueError, match="must be 'teacher' or 'scratch'"):
        Discriminator(T, init="imagenet")


def test_gradients_reach_x_z_and_every_head():
    T = teacher()
    D = Discriminator(T)
    x, z, ctx, _ = inputs(T.cfg)
    x.requires_grad_(True)
    unzero(D)
    sum(o.mean() for o in D(x, z, ctx)).backward()
    assert x.grad.abs().sum() > 0
    assert D.z_conv.weight.grad.abs().sum() > 0 and all(c.weight.grad.abs().sum() > 0 for c in D.x_convs)
    assert all(h[2].weight.grad is not None for hs in D.heads for h in hs)


def test_compiled_d_follows_the_requires_grad_toggle():
    """train.py compiles D and flips its parameters' requires_grad between D's step (D learns) and G's step (D is a
    frozen critic). The compiled D must run the graph that matches each time: reusing the frozen one in D's step
    would leave D without gradients, silently (pytorch/pytorch#139476 reports dynamo doing so). Checked
    with train.py's inputs, and with only the parameters' flag changing. aot_eager: dynamo's guards and AOTAutograd's
    choice of gradients, without the minutes of inductor codegen."""
    T = teacher()
    D = Discriminator(T).train()
    unzero(D)
    x, z, ctx, _ = inputs(T.cfg, b=3)
    compiled = torch.compile(D, backend="aot_eager")

    def grads(net, b, x_grad, trainable):  # which parameters get a gradient, and whether x does
        D.requires_grad_(trainable)
        x_in = x[:b].detach().clone().requires_grad_(x_grad)
        sum(o.mean() for o in net(x_in, z[:b], ctx[:b])).backward()
        got = {n for n, p in D.named_parameters() if p.grad is not None}
        D.zero_grad(set_to_none=True)
        return got, x_in.grad is not None

    want_d, want_g = grads(D, 3, False, True), grads(D, 2, True, False)  # eager: the reference
    assert len(want_d[0]) > 100 and want_d[1] is False and want_g == (set(), True)
    for _ in range(2):  # train.py's pattern: D's batch has no gradient, G's fakes do (and are fewer)
        assert grads(compiled, 3, False, True) == want_d
        assert grads(compiled, 2, True, False) == want_g
    for _ in range(2):  # only the parameters' flag changes: the case of the dynamo bug
        assert grads(compiled, 3, True, True) == (want_d[0], True)
        assert grads(compiled, 3, True, False) == (set(), True)
