"""The U-Net: shapes, residual start, a tiny overfit, and tiled inference equal to whole-image inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from denoise.infer import denoise_slices, tile_starts
from denoise.model import UNet, UNetConfig, estimate_noise_hu


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def test_residual_network_starts_as_identity_and_checks_its_input():
    net = UNet(UNetConfig(width=4, depth=2))
    x = torch.randn(2, 1, 16, 24)
    assert torch.equal(net(x), x)
    with pytest.raises(ValueError, match=r"multiples of 4"):
        net(torch.randn(1, 1, 18, 16))
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        net(torch.randn(1, 2, 16, 16))
    with pytest.raises(ValueError, match="norm"):
        UNetConfig(norm="group")


def test_overfits_a_tiny_batch():
    rng = np.random.default_rng(0)
    clean = np.zeros((4, 1, 16, 16), np.float32)
    for k in range(4):
        r, c = rng.integers(2, 8, size=2)
        clean[k, 0, r : r + 6, c : c + 5] = 1.0
    noisy = clean + rng.normal(0, 0.2, clean.shape).astype(np.float32)
    x, y = torch.from_numpy(noisy), torch.from_numpy(clean)
    net = UNet(UNetConfig(width=8, depth=2, residual=False))
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(120):
        loss = torch.nn.functional.mse_loss(net(x), y)
        losses.append(loss.item())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert min(losses[-5:]) < losses[0] / 10


def _random_net(**config) -> UNet:
    net = UNet(UNetConfig(**config))
    for p in net.parameters():  # a non-trivial function everywhere (the residual head starts at zero)
        torch.nn.init.normal_(p, std=0.1)
    return net.eval()


@pytest.mark.parametrize("config", [dict(width=6, depth=2), dict(width=6, depth=2, space_to_depth=2),
                                    dict(width=4, depth=3, norm="batch"), dict(width=6, depth=2, noise_level_input=True)],
                         ids=["plain", "space-to-depth", "batchnorm", "noise-level"])
def test_tiled_equals_whole_image(config):
    net = _random_net(**config)
    hu = np.random.default_rng(1).normal(0, 200, (2, 150, 133)).astype(np.float32)
    whole = denoise_slices(net, hu, tile_px=256)
    tiled = denoise_slices(net, hu, tile_px=64, overlap_px=24, batch_size=3)
    scale = np.abs(whole).mean()
    assert np.abs(tiled - whole).max() < 0.01 * scale
    assert np.abs(tiled - whole).mean() < 0.001 * scale


@pytest.mark.parametrize("ensemble", [2, 4, 8])
def test_a_self_ensemble_averages_the_mirrored_outputs(ensemble):
    net = _random_net(width=6, depth=2)
    hu = np.random.default_rng(5).normal(0, 200, (2, 48, 40)).astype(np.float32)
    # each member by hand: mirror the whole slices, denoise, mirror back
    mirrors = [lambda a: a, lambda a: a[..., ::-1], lambda a: a[..., ::-1, :], lambda a: a[..., ::-1, ::-1]]
    mirrors += [lambda a, m=m: m(a).swapaxes(-1, -2) for m in mirrors]
    undo = mirrors[:4] + [lambda a, m=m: m(a.swapaxes(-1, -2)) for m in mirrors[:4]]
    members = [undo[i](denoise_slices(net, np.ascontiguousarray(mirrors[i](hu)), tile_px=64, overlap_px=8))
               for i in range(ensemble)]
    expected = np.mean(members, axis=0)
    got = denoise_slices(net, hu, tile_px=64, overlap_px=8, ensemble=ensemble)
    assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).mean()
    assert np.abs(got - members[0]).max() > 1e-2 * np.abs(expected).mean()  # the members differ
    # tiled and whole still agree
    tiled = denoise_slices(net, hu, tile_px=16, overlap_px=6, ensemble=ensemble)
    assert np.abs(tiled - got).max() < 0.01 * np.abs(got).mean()


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (33, 17), (3, 40, 9)])
def test_odd_shapes_come_back_with_the_same_shape(shape):
    net = _random_net(width=4, depth=3)
    hu = np.random.default_rng(2).normal(0, 100, shape).astype(np.float32)
    out = denoise_slices(net, hu, tile_px=16, overlap_px=4)
    assert out.shape == hu.shape and out.dtype == np.float32 and np.isfinite(out).all()


def test_noise_level_estimate_and_input():
    rng = np.random.default_rng(3)
    tissue = torch.from_numpy(rng.normal(40, 25, (2, 1, 96, 96)).astype(np.float32))
    tissue[1] = 40 + (tissue[1] - 40) / 5  # a fifth of the noise
    levels = estimate_noise_hu(tissue)
    assert levels[0].item() == pytest.approx(25, rel=0.1) and levels[1].item() == pytest.approx(5, rel=0.1)
    net = _random_net(width=6, depth=2, noise_level_input=True)
    x = tissue / 1000
    # the level changes the output; without one the network measures its input
    assert not torch.allclose(net(x, torch.tensor([25.0, 25.0])), net(x, torch.tensor([5.0, 5.0])))
    assert torch.allclose(net(x), net(x, levels))


def test_a_blind_checkpoint_grows_a_noise_level_input_that_changes_nothing_yet():
    from denoise.train import with_noise_level_input

    blind = _random_net(width=6, depth=2)
    grown = with_noise_level_input(blind)
    assert grown.config.noise_level_input and not blind.config.noise_level_input
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(grown(x, torch.tensor([3.0, 30.0])), blind(x), atol=1e-6)


def test_a_network_widens_into_one_that_computes_the_same_and_learns_with_its_new_channels():
    from denoise.train import widened

    narrow = _random_net(width=4, depth=2)
    for p in narrow.head.parameters():  # a residual head starts at zero: make the output depend on everything
        torch.nn.init.normal_(p, std=0.1)
    wide = widened(narrow, 6)
    assert wide.config.width == 6 and wide.parameter_count() > narrow.parameter_count()
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(wide(x), narrow(x), atol=1e-6)
    # level 1 had 8 channels and now has 12: the weights reading the 4 new ones learn first, then those feeding them
    optimiser = torch.optim.SGD(wide.parameters(), lr=0.1)
    for step in range(2):
        optimiser.zero_grad()
        (wide(x) - x).square().mean().backward()
        assert wide.encoders[1][2].weight.grad[:, 8:].abs().sum() > 0
        feeding = wide.encoders[1][0].weight.grad[8:].abs().sum()
        assert feeding == 0 if step == 0 else feeding > 0
        optimiser.step()
    with pytest.raises(ValueError, match="width"):
        widened(narrow, 2)


def test_tile_starts_cover_and_align():
    starts = tile_starts(304, 96, 16, 8)
    assert starts[0] == 0 and starts[-1] == 304 - 96
    assert all(s % 8 == 0 for s in starts) and all(b - a <= 80 for a, b in zip(starts, starts[1:]))


def test_options_are_checked():
    net = _random_net(width=4, depth=2)
    hu = np.zeros((8, 8), np.float32)
    with pytest.raises(ValueError, match="float16 needs a CUDA device"):
        denoise_slices(net, hu, precision="float16", device="cpu")
    with pytest.raises(ValueError, match="tile_px"):
        denoise_slices(net, hu, tile_px=30)
    with pytest.raises(ValueError, match="ensemble: expected one of 1, 2, 4, 8, got 3"):
        denoise_slices(net, hu, ensemble=3)
    with pytest.raises(ValueError, match=r"expected slices \[N, H, W\]"):
        denoise_slices(net, np.zeros((1, 1, 4, 4)))
    assert denoise_slices(net, hu, precision="bfloat16").shape == (8, 8)


def test_auto_precision_is_bfloat16_only_where_the_hardware_has_it(monkeypatch):
    import denoise.infer as infer

    flags = "flags\t\t: fpu sse2 avx2 avx512f avx512bw"
    assert not infer.cpu_has_native_bfloat16(flags)
    assert infer.cpu_has_native_bfloat16(flags + " avx512_bf16") and infer.cpu_has_native_bfloat16(flags + " amx_bf16")
    assert not infer.cpu_has_native_bfloat16(flags + " avx512_bf16x")  # whole flags only
    for native in (True, False):
        monkeypatch.setattr(infer, "cpu_has_native_bfloat16", lambda: native)
        assert infer.resolve_precision("auto", "cpu") == ("bfloat16" if native else "float32")
    assert infer.resolve_precision("float32", "cpu") == "float32" and infer.resolve_precision("float16", "cuda") == "float16"
    assert infer.resolve_ensemble(None, "bfloat16") == 4 and infer.resolve_ensemble(None, "float32") == 1
    assert infer.resolve_ensemble(2, "bfloat16") == 2


def test_bfloat16_on_the_cpu_is_close_to_float32():
    net = _random_net(width=6, depth=2)
    hu = np.random.default_rng(4).normal(0, 200, (2, 64, 64)).astype(np.float32)
    full = denoise_slices(net, hu, tile_px=64, overlap_px=16)
    half = denoise_slices(net, hu, tile_px=64, overlap_px=16, precision="bfloat16")
    assert not np.array_equal(full, half)  # it did run in bfloat16
    assert np.abs(half - full).max() < 2e-2 * np.abs(full).max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["float32", "float16", "bfloat16"])
def test_cuda_matches_cpu(precision):
    net = _random_net(width=6, depth=2)
    hu = np.random.default_rng(3).normal(0, 200, (2, 70, 90)).astype(np.float32)
    cpu = denoise_slices(net, hu, tile_px=64, overlap_px=16, device="cpu")
    gpu = denoise_slices(net, hu, tile_px=64, overlap_px=16, device="cuda", precision=precision)
    tolerance = 1e-3 if precision == "float32" else 2e-2
    assert np.abs(gpu - cpu).max() < tolerance * np.abs(cpu).max()
