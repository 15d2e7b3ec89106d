"""ECAR's multistage flow identities and its networks (models/ecar.py), on tiny configs."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from effgen.models import ecar as E
from effgen.runtime import stage_pipeline as SP

GAMMAS = (1 / 3, 0.2)
N_SAMPLES = 20_000


def tiny(**kw) -> E.ECARConfig:
    base = dict(sample_size=16, patch_size=4, stages=(1, 2, 4), num_classes=5, width=32, depth=2,
                heads=2, head_width=32, head_depth=2, head_heads=2, boundaries=(0.0, 1 / 3, 2 / 3),
                stage_steps=(2, 2, 2), cfg_scale=2.0)
    return E.ECARConfig(**{**base, **kw})


def block_cov(x: torch.Tensor) -> torch.Tensor:
    """Empirical covariance of the 4 pixels of the top-left 2x2 block, (4, 4)."""
    v = x[:, 0, :2, :2].reshape(len(x), 4).double()
    v = v - v.mean(0)
    return v.T @ v / (len(x) - 1)


def test_block_noise_sums_to_zero_over_every_block_for_gamma_one_third():
    z = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    m = E.block_noise(z, 1 / 3)
    sums = torch.nn.functional.avg_pool2d(m, 2) * 4
    assert sums.abs().max() < 1e-5
    assert m.std() > 0.5  # not trivially zero
    np.testing.assert_allclose(SP.block_noise(z.numpy(), 0.0), m.numpy(), atol=1e-6)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_block_noise_covariance_is_identity_minus_alpha2_J(gamma):
    cfg = tiny(gamma=gamma)
    z = torch.randn(N_SAMPLES, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    cov = block_cov(E.block_noise(z, gamma))
    expected = torch.eye(4, dtype=torch.float64) - cfg.alpha ** 2 * torch.ones(4, 4, dtype=torch.float64)
    assert (cov - expected).abs().max() < 0.03
    # Sigma_gamma itself = (1 + gamma) I - gamma J, i.e. block_noise / beta
    beta2 = 1 / (1 + gamma)
    sigma = cov / beta2
    assert abs(sigma[0, 0].item() - 1) < 0.04 and abs(sigma[0, 1].item() + gamma) < 0.04


@pytest.mark.parametrize("gamma", GAMMAS)
def test_noise_chain_is_white_at_every_stage(gamma):
    cfg = tiny(gamma=gamma)
    g = torch.Generator().manual_seed(2)
    z = [torch.randn(N_SAMPLES, 1, cfg.pixels(s), cfg.pixels(s), generator=g) for s in range(3)]
    for eps in E.noise_chain(cfg, z):
        cov = block_cov(eps)
        assert (cov - torch.eye(4, dtype=torch.float64)).abs().max() < 0.03
        # and across neighbouring blocks
        a, b = eps[:, 0, 0, 1].double(), eps[:, 0, 0, 2].double()
        assert abs(((a - a.mean()) * (b - b.mean())).mean().item()) < 0.03


@pytest.mark.parametrize("gamma", GAMMAS)
def test_renoised_end_of_a_stage_has_the_start_marginal_of_the_next(gamma):
    """Sampling-time jump: up(E_{s-1}) renoised must be distributed as stage s's training start
    point tau * up(down_{s-1} x) + (1 - tau) * white noise, for a fixed image x."""
    cfg = tiny(gamma=gamma)
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    data = E.stage_maps(cfg, x)
    g = torch.Generator().manual_seed(4)
    ranges = cfg.stage_ranges()
    for s in (1, 2):
        tau, end_prev = ranges[s][0], ranges[s - 1][1]
        eps_prev = torch.randn(N_SAMPLES, 1, *data[s - 1].shape[2:], generator=g)
        E_prev = end_prev * data[s - 1] + (1 - end_prev) * eps_prev
        start = E.renoise(cfg, s, E_prev, torch.randn(N_SAMPLES, 1, *data[s].shape[2:], generator=g))
        mean = start.mean(0, keepdim=True)
        assert (mean - tau * E.upsample(data[s - 1])).abs().max() < 0.03
        assert (start.std(0) - (1 - tau)).abs().max() < 0.03 * (1 - tau) + 0.01
        cov = block_cov(start) / (1 - tau) ** 2
        assert (cov - torch.eye(4, dtype=torch.float64)).abs().max() < 0.04


def test_time_boundaries_are_continuous():
    for gamma in GAMMAS:
        cfg = tiny(gamma=gamma)
        r = cfg.stage_ranges()
        assert r[0][0] == 0.0 and r[-1][1] == 1.0
        for (a0, a1), (b0, b1) in zip(r, r[1:]):
            assert a0 < a1 <= 1 and b0 < b1 and a0 < b0
            # data coefficient carried through the jump: (tau + a) * end_prev == tau
            data_scale, noise_scale = cfg.renoise_coefficients(r.index((b0, b1)))
            assert math.isclose(data_scale * a1, b0) and math.isclose(noise_scale, 1 - b0)
    # gamma = 1/3: Pyramid Flow's rule; the block means keep their signal-to-noise ratio
    # (a block mean of white noise has std 1/2): end/(1-end) == tau/((1-tau)/2).
    cfg = tiny()
    r = cfg.stage_ranges()
    for s in (1, 2):
        tau, end = r[s][0], r[s - 1][1]
        assert math.isclose(end, 2 * tau / (1 + tau))
        assert math.isclose(end / (1 - end), tau / ((1 - tau) / 2))
        assert cfg.renoise_coefficients(s) == pytest.approx(((1 + tau) / 2, 1 - tau))
    assert E.baseline(cfg, "flowar").stage_ranges() == [(0.0, 1.0)] * 3
    assert E.baseline(cfg, "single-stage").stage_ranges() == [(0.0, 1.0)]


def test_training_start_points_are_the_sampling_jump_exactly():
    """What ECAR.loss trains on (the noise chain) equals what `sample` does (renoise)."""
    cfg = tiny()
    g = torch.Generator().manual_seed(5)
    x = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    data = E.stage_maps(cfg, x)
    z = [torch.randn(d.shape, generator=g) for d in data]
    eps = E.noise_chain(cfg, z)
    r = cfg.stage_ranges()
    for s in (1, 2):
        tau, end_prev = r[s][0], r[s - 1][1]
        E_prev = end_prev * data[s - 1] + (1 - end_prev) * eps[s - 1]
        train_start = tau * E.upsample(data[s - 1]) + (1 - tau) * eps[s]
        torch.testing.assert_close(E.renoise(cfg, s, E_prev, z[s]), train_start, atol=1e-5, rtol=0)


def test_patchify_roundtrip_and_numpy_twins():
    x = torch.randn(2, 3, 16, 16)
    t = E.patchify(x, 4)
    assert t.shape == (2, 16, 48)
    torch.testing.assert_close(E.unpatchify(t, 4, 3), x)
    np.testing.assert_array_equal(SP.patchify(x.numpy(), 4), t.numpy())
    np.testing.assert_array_equal(SP.upsample(x.numpy()), E.upsample(x).numpy())
    np.testing.assert_allclose(SP.block_mean(x.numpy()), E.block_mean(x).numpy(), atol=1e-6)
    # token 1 is the patch right of token 0
    np.testing.assert_array_equal(t[0, 1].reshape(4, 4, 3).permute(2, 0, 1).numpy(), x[0, :, :4, 4:8].numpy())


def test_ar_is_block_causal_and_stage_graph_matches_teacher_forcing(perturbed_ecar):
    cfg = tiny()
    model = perturbed_ecar(cfg)
    g = torch.Generator().manual_seed(6)
    labels = torch.tensor([0, 5])
    prefix = torch.randn(2, cfg.seq_len - 1, cfg.token_dim, generator=g)
    with torch.no_grad():
        full = model.ar(prefix, labels)
        changed = prefix.clone()
        changed[:, cfg.offset(2) - 1:] += 1.0  # the inputs of the last stage
        full2 = model.ar(changed, labels)
        assert torch.allclose(full[:, :cfg.offset(2)], full2[:, :cfg.offset(2)], atol=1e-6)
        assert not torch.allclose(full[:, cfg.offset(2):], full2[:, cfg.offset(2):])
        for s in range(3):
            part = prefix[:, :cfg.offset(s + 1) - 1] if s else None
            z = model.ar(part, labels, upto=s)
            torch.testing.assert_close(z, full[:, cfg.offset(s):cfg.offset(s + 1)], atol=1e-5, rtol=0)
    mask = E.block_causal_mask(cfg)
    assert mask[0, 1:].sum() == 0 and mask[1:5, :5].all() and not mask[1:5, 5:].any()


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, above all on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("kind", ["ecar", "flowar", "single-stage", "mlp-head"])
def test_training_reduces_the_loss_and_sampling_runs(kind, one_thread):
    cfg = tiny(width=16, heads=1, head_width=16, head_heads=1, depth=1)
    cfg = {"ecar": cfg, "flowar": E.baseline(cfg, "flowar"),
           "single-stage": E.baseline(cfg, "single-stage"),
           "mlp-head": dataclasses.replace(cfg, head_type="mlp")}[kind]
    torch.manual_seed(0)
    model = E.ECAR(cfg)
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(7)) * 2 - 1
    labels = torch.arange(8) % 6
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_at(seed):
        return model.loss(x, labels, torch.Generator().manual_seed(seed))

    with torch.no_grad():
        before = np.mean([loss_at(100 + i).item() for i in range(8)])
    for i in range(80):
        loss = loss_at(i)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = np.mean([loss_at(100 + i).item() for i in range(8)])
    assert after < 0.9 * before, (before, after)
    out = E.sample(model.eval(), [1, 2], E.stage_noise(cfg, 0, 2))
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()


def test_config_validation_and_spec_baselines():
    from effgen.models.configs import get_spec

    with pytest.raises(ValueError, match="double"):
        tiny(stages=(1, 3, 4))
    with pytest.raises(ValueError, match="gamma"):
        tiny(gamma=0.5)
    with pytest.raises(ValueError, match="boundaries"):
        tiny(boundaries=(0.0, 0.5, 0.4))
    ref = E.config_of(get_spec("ecar"))
    assert ref == E.ECARConfig()
    assert E.config_of(get_spec("ecar-flowar-ref")) == E.baseline(ref, "flowar")
    assert E.config_of(get_spec("ecar-single-stage-ref")) == E.baseline(ref, "single-stage")
    assert E.ECARConfig.from_dict(ref.to_dict()) == ref


def test_checkpoint_roundtrip_checks_config(tmp_path, perturbed_ecar):
    cfg = tiny()
    model = perturbed_ecar(cfg)
    path = tmp_path / "e.safetensors"
    E.save_checkpoint(model, path, {"steps": 3})
    loaded = E.load_checkpoint(path, cfg)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="another ECAR config.*boundaries"):
        E.load_checkpoint(path, dataclasses.replace(cfg, boundaries=(0.0, 0.3, 0.6)))
    # sampling settings are free: the given config wins
    assert E.load_checkpoint(path, dataclasses.replace(cfg, cfg_scale=4.0)).cfg.cfg_scale == 4.0
