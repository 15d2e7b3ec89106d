"""The shared training loop of the reference models (models/training.py)."""

from __future__ import annotations

import dataclasses
import math
import re

import torch
from safetensors.torch import load_file

import pytest

from effgen.models.configs import get_spec
from effgen.models.denoiser import WEIGHTS_DIR, build_denoiser
from effgen.models.training import (TrainConfig, TrainingDiverged, attention_logit_max, dit_init,
                                    label_dropout_by_caller, learning_rate, min_snr_weight, train)


def test_learning_rate_warms_up_then_decays_to_the_floor_over_the_budget():
    cfg = TrainConfig(lr=1e-3, warmup=10, final_lr_fraction=0.1)
    assert math.isclose(learning_rate(cfg, 0, 110, 0.0), 1e-4)
    assert math.isclose(learning_rate(cfg, 10, 110, 0.0), 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 10 / 110))))
    assert math.isclose(learning_rate(cfg, 110, 110, 0.0), 1e-4)
    # a time budget that ends first wins
    timed = TrainConfig(lr=1e-3, warmup=10, minutes=1.0)
    assert math.isclose(learning_rate(timed, 20, 10_000, 60.0), 1e-4)
    assert learning_rate(timed, 20, 10_000, 30.0) < learning_rate(timed, 20, 10_000, 0.0)


def test_train_fits_a_regression_and_keeps_an_ema_and_checkpoints():
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    model = torch.nn.Linear(4, 1, bias=False)
    ema = torch.nn.Linear(4, 1, bias=False).requires_grad_(False)
    saved = []

    def loss_fn():
        return torch.nn.functional.mse_loss(model(x).squeeze(1), y)

    cfg = TrainConfig(lr=0.05, steps=400, warmup=20, ema=0.9, save_every=200)
    first = loss_fn().item()
    step, mean_loss = train(model, ema, model, loss_fn, cfg, lambda s, l: saved.append(s))
    assert step == 400 and mean_loss < first and loss_fn().item() < 1e-3 * first
    assert saved == [200, 400, 400]
    assert torch.allclose(ema.weight, model.weight, atol=0.05)


def test_named_loss_terms_are_summed_and_each_printed(capsys):
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    model = torch.nn.Linear(4, 1, bias=False)
    ema = torch.nn.Linear(4, 1, bias=False).requires_grad_(False)

    def loss_fn():  # a fit term and a pull of the weights towards 1, which the fit opposes
        return {"fit": torch.nn.functional.mse_loss(model(x).squeeze(1), y),
                "pull": 0.1 * (model.weight - 1).square().sum()}

    first = sum(v.item() for v in loss_fn().values())
    train(model, ema, model, loss_fn, TrainConfig(lr=0.05, steps=300, warmup=20), lambda s, l: None)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step 300 ")]
    loss, fit, pull = (float(re.search(rf"{k} ([0-9.]+)", lines[0]).group(1))
                       for k in ("loss", "fit", "pull"))
    # both terms are optimised: the weights settle between the fit's and the pull's optimum
    assert fit > 1e-3 and pull > 1e-3 and math.isclose(loss, fit + pull, abs_tol=2e-4)
    assert loss < 0.1 * first


def test_a_nan_step_stops_training_before_it_is_saved():
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randn(64)
    model = torch.nn.Linear(4, 1)
    ema = torch.nn.Linear(4, 1).requires_grad_(False)
    saved, calls = [], [0]

    def loss_fn():
        calls[0] += 1
        loss = torch.nn.functional.mse_loss(model(x).squeeze(1), y)
        return loss * float("nan") if calls[0] == 250 else loss

    cfg = TrainConfig(lr=0.01, steps=1000, warmup=10, save_every=200)
    with pytest.raises(TrainingDiverged, match="by step 300 .*checkpoint of step 200 is kept"):
        train(model, ema, model, loss_fn, cfg, lambda s, l: saved.append(s))
    assert saved == [200] and calls[0] == 300  # stopped at the first printed loss after it
    assert torch.isnan(model.weight).all()  # what would have been saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_steps_train_as_eager_steps_do():
    """The replays of one captured step train as the eager steps do: the same random draws
    (the generator registered with the graph advances on each replay), the same learning rate
    schedule (read from a tensor the loop overwrites), the same weights, EMA and losses."""
    def run(cuda_graph: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(),
                                    torch.nn.Linear(32, 1)).cuda()
        ema = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(),
                                  torch.nn.Linear(32, 1)).cuda().requires_grad_(False)
        g = torch.Generator("cuda").manual_seed(0)
        w = torch.linspace(-1, 1, 8, device="cuda")[:, None]

        def loss_fn():
            x = torch.randn(64, 8, generator=g, device="cuda")
            return {"fit": (model(x) - x @ w).square().mean(),
                    "decay": 1e-3 * model[0].weight.square().sum()}

        cfg = TrainConfig(lr=1e-2, steps=60, warmup=10, save_every=30, bf16=False,
                          cuda_graph=cuda_graph)
        saved = []
        step, loss = train(model, ema, model, loss_fn, cfg, lambda s, l: saved.append((s, l)),
                           generators=[g])
        return model.state_dict(), ema.state_dict(), saved, loss_fn()["fit"].item()

    eager, graphed = run(False), run(True)
    for a, b in zip(eager[:2], graphed[:2]):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert [s for s, _ in graphed[2]] == [30, 60, 60]
    assert [l for _, l in graphed[2]] == pytest.approx([l for _, l in eager[2]], rel=1e-4)
    assert graphed[3] < 0.1 * eager[2][0][1]  # it learned


def test_cuda_graph_needs_a_cuda_device():
    model = torch.nn.Linear(4, 1)
    with pytest.raises(ValueError, match="cuda_graph: the model is on cpu, not on a CUDA device"):
        train(model, torch.nn.Linear(4, 1), model, lambda: model.weight.sum(),
              TrainConfig(cuda_graph=True), lambda s, l: None)


def test_a_budget_already_reached_is_an_error_not_a_divergence():
    model = torch.nn.Linear(4, 1)
    ema = torch.nn.Linear(4, 1).requires_grad_(False)
    saved = []
    with pytest.raises(ValueError, match="nothing to train"):
        train(model, ema, model, lambda: model.weight.sum(), TrainConfig(steps=5), saved.append, 5)
    assert saved == []


@pytest.mark.parametrize("name", ["dit-tiny", "pixart-tiny"])
def test_dit_init_zeroes_residual_writes_and_output_but_the_output_layer_still_learns(name):
    model = build_denoiser(get_spec(name))
    dit_init(model.transformer)
    inputs = model.example_inputs(2)
    blocks = model.transformer.transformer_blocks
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(torch.equal(i[0], o)))
             for b in blocks]
    out = model(*inputs)
    for h in hooks:
        h.remove()
    # adaLN gates (DiT) and the cross-attention output (PixArt) start at zero; PixArt's
    # self-attention and MLP are gated by its learned scale_shift_table, so only DiT blocks
    # are exactly the identity.
    if name == "dit-tiny":
        assert seen == [True] * len(blocks)
    assert torch.count_nonzero(out) == 0  # the output layer starts at zero
    out.sum().backward()  # ... but it receives a gradient, so training moves it
    head = model.transformer.proj_out_2 if name == "dit-tiny" else model.transformer.proj_out
    assert head.weight.grad.abs().sum() > 0


def test_dit_label_dropout_is_left_to_the_caller_so_every_block_sees_the_same_label():
    model = build_denoiser(get_spec("dit-tiny")).train()
    for p in model.transformer.parameters():  # no zero-initialised gates: labels matter
        torch.nn.init.normal_(p, std=0.3)
    sample, timestep, _ = model.example_inputs(64)
    labels = torch.arange(64) % 10
    # diffusers as built: each block drops labels to the null class on its own draw, so two
    # calls on the same input differ
    torch.manual_seed(0)
    assert not torch.equal(model(sample, timestep, labels), model(sample, timestep, labels))
    label_dropout_by_caller(model.transformer)
    in_training = model(sample, timestep, labels)
    assert torch.equal(in_training, model(sample, timestep, labels))
    model.eval()
    assert torch.equal(in_training, model(sample, timestep, labels))
    # the null class is still there to be given: label num_classes in every block
    null = model(sample, timestep, torch.full((64,), 10))
    assert not torch.allclose(null, in_training)
    with pytest.raises(ValueError, match="no diffusers LabelEmbedding"):
        label_dropout_by_caller(build_denoiser(get_spec("pixart-tiny")).transformer)


@pytest.mark.parametrize("name", ["dit-tiny", "pixart-tiny"])
def test_attention_logit_max_is_the_largest_logit_each_self_attention_computes(name, monkeypatch):
    """attention_logit_max reads the logits off to_q and to_k; here they are taken from what
    the attention itself is given (torch's scaled_dot_product_attention), over two calls."""
    model = build_denoiser(get_spec(name)).eval()
    for p in model.transformer.parameters():  # random weights, so that every block's differ
        torch.nn.init.normal_(p, std=0.1)
    given = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        given.append(float((q @ k.transpose(-1, -2)).abs().max()) * q.shape[-1] ** -0.5)
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    small, large = model.example_inputs(2), model.example_inputs(2)
    large = (4 * large[0], *large[1:])
    with torch.no_grad(), attention_logit_max(model.transformer) as found:
        model(*small)
        model(*large)
    blocks = len(model.transformer.transformer_blocks)
    per_call = len(given) // (2 * blocks)  # DiT: self-attention; PixArt: self, then cross
    self_attention = given[::per_call]
    expected = [max(a, b) for a, b in zip(self_attention[:blocks], self_attention[blocks:])]
    assert found == pytest.approx(expected, rel=1e-4)
    assert len(set(found)) == blocks
    with torch.no_grad():
        model(*small)  # the hooks are gone after the block
    assert len(found) == blocks and found == pytest.approx(expected, rel=1e-4)


def test_training_pictures_are_the_same_shards_whatever_the_number_of_workers(monkeypatch):
    import numpy as np

    from effgen.models import refdata, training

    monkeypatch.setattr(training, "SHARD_SIZE", 4)
    serial, attrs = training.training_pictures(10, seed=3)
    parallel, attrs_parallel = training.training_pictures(10, seed=3, workers=2)
    assert serial.shape == (10, 32, 32, 3) and attrs == attrs_parallel
    np.testing.assert_array_equal(serial, parallel)
    # shard k is refdata's data set of seed 1000 * seed + k; the last shard is the remainder
    shard1, _ = refdata.make_dataset(4, "train", seed=3001)
    np.testing.assert_array_equal(serial[4:8], shard1)
    assert len({a.caption for a in attrs}) > 1
    assert not {(a.shape, a.colour, f"{a.row} {a.col}") for a in attrs} & refdata.heldout_triples()


@pytest.mark.parametrize("v_prediction", [True, False])
def test_min_snr_weight_is_min_snr_gamma_on_the_x0_error_whatever_the_target(v_prediction):
    torch.manual_seed(0)
    abar = torch.tensor([0.999, 0.9, 0.5, 0.1, 1e-3])
    x0, eps, x0_hat = torch.randn(3, 5, 8)
    xt = abar.sqrt()[:, None] * x0 + (1 - abar).sqrt()[:, None] * eps
    # the network's prediction that corresponds to x0_hat at the same x_t
    eps_hat = (xt - abar.sqrt()[:, None] * x0_hat) / (1 - abar).sqrt()[:, None]
    if v_prediction:
        target = abar.sqrt()[:, None] * eps - (1 - abar).sqrt()[:, None] * x0
        pred = abar.sqrt()[:, None] * eps_hat - (1 - abar).sqrt()[:, None] * x0_hat
    else:
        target, pred = eps, eps_hat
    weighted = min_snr_weight(abar, 5.0, v_prediction) * (pred - target).square().mean(1)
    snr = abar / (1 - abar)
    expected = torch.minimum(snr, torch.tensor(5.0)) * (x0_hat - x0).square().mean(1)
    assert torch.allclose(weighted, expected, rtol=1e-4)


@pytest.mark.parametrize("script,model", [("train_ecar", "ecar-tiny"), ("train_reference", "dit-ref"),
                                          ("train_reference", "pixart-ref")])
def test_training_scripts_resume_from_their_checkpoint_and_count_steps_on(tmp_path, script, model,
                                                                         sample_script, capsys):
    from safetensors import safe_open

    run = sample_script(script).main
    # pixart-ref: the captions' MiniLM states encoded once, then read from the cache
    cache = ["--caption-states", str(tmp_path / "states.safetensors")] if model == "pixart-ref" else []

    def train_to(out, steps, *extra):
        run([model, "--steps", str(steps), "--batch", "2", "--data-size", "8", "--threads", "1",
             "--out", str(out), *cache, *extra])
        with safe_open(str(out), "pt") as f:
            return load_file(out), f.metadata()["steps"]

    # dit-ref: with the distillation from pixart-ref (--distill-from) on the way
    distill = ["--distill-from", "pixart-ref", "--distill-batch", "2"] if model == "dit-ref" else []
    first, _ = train_to(tmp_path / "a.safetensors", 2, *distill)
    # Resumed with another seed: the weights continue from the checkpoint, where a fresh run
    # with that seed starts from its own initialisation.
    resumed, steps = train_to(tmp_path / "a.safetensors", 3, "--resume", "--seed", "1")
    fresh, _ = train_to(tmp_path / "b.safetensors", 1, "--seed", "1")
    assert steps == "3"

    def dist(x, y):
        return max(float((x[k] - y[k]).abs().max()) for k in x)

    assert dist(resumed, first) < 0.1 * dist(fresh, first)
    # A run that diverges (an absurd learning rate) leaves the checkpoint it resumed from as it was.
    before = (tmp_path / "a.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="error: training diverged .*checkpoint of step 3 is kept"):
        train_to(tmp_path / "a.safetensors", 6, "--resume", "--lr", "1e30")
    assert (tmp_path / "a.safetensors").read_bytes() == before
    # --steps counts from the start of training: a checkpoint already there is a clean error.
    with pytest.raises(SystemExit):
        train_to(tmp_path / "a.safetensors", 3, "--resume")
    assert "is at step 3, not below --steps 3" in capsys.readouterr().err
    assert (tmp_path / "a.safetensors").read_bytes() == before
    with pytest.raises(SystemExit):  # nothing to resume from
        train_to(tmp_path / "missing.safetensors", 2, "--resume")
    assert "does not exist" in capsys.readouterr().err


def test_loss_by_noise_reports_the_shipped_models_against_an_untrained_one(tmp_path, sample_script):
    """`train_reference.py --loss-by-noise`: the training loss per range of timesteps, the
    diagnostic that says which noise levels a checkpoint has learned."""
    import json

    run = sample_script("train_reference").main

    def table(*extra) -> list[dict]:
        out = tmp_path / "bins.json"
        run(["dit-ref", "--loss-by-noise", "32", "--threads", "1", "--json", str(out), *extra])
        return json.loads(out.read_text())["bins"]

    shipped = table()
    assert [(r["t_from"], r["t_to"]) for r in shipped] == [(i, i + 99) for i in range(0, 1000, 100)]
    # dit-ref's attention: its largest logit is in the thousands (block 3), an untrained
    # model's a few units (the reason it trains in fp32 on CUDA: README, Reference models)
    def logits() -> list[float]:  # of the last table
        return json.loads((tmp_path / "bins.json").read_text())["attention_logit_max"]

    shipped_logits = logits()
    untrained = tmp_path / "untrained.safetensors"
    run(["dit-ref", "--steps", "1", "--batch", "2", "--data-size", "8", "--threads", "1",
         "--out", str(untrained)])
    fresh = table("--out", str(untrained))
    assert all(s["loss"] < f["loss"] for s, f in zip(shipped, fresh))
    assert len(shipped_logits) == len(logits()) == 6
    assert max(shipped_logits) > 1000 > 100 * max(logits())
    # The class label leaves position, size and background open: at the highest noise the
    # trained model can only predict their mean, at low noise it sees them.
    assert shipped[-1]["loss"] > 10 * shipped[1]["loss"]
    assert table() == shipped  # seeded
    # With --distill-from, the distillation loss on the same draws: the shipped weights are
    # far nearer pixart-ref than an untrained model is.
    teacher = ("--distill-from", "pixart-ref",
               "--caption-states", str(tmp_path / "captions.safetensors"))
    shipped_distill = table(*teacher)
    assert [{k: v for k, v in r.items() if k != "distill"} for r in shipped_distill] == shipped
    fresh_distill = table(*teacher, "--out", str(untrained))
    assert all(s["distill"] < f["distill"] for s, f in zip(shipped_distill, fresh_distill))
    with pytest.raises(SystemExit):
        table("--out", str(tmp_path / "missing.safetensors"))
    # The implicit shape classifier: a model that has not learned the class gets no shape
    # right where the picture shows it; the shipped one does, and pixart-ref, told the shape
    # in its caption, does better (README, Reference models: 0.67 against 0.97 at t 200-299).
    low = lambda rows: sum(r["shape_acc"] for r in rows[:3]) / 3  # noqa: E731
    pixart = tmp_path / "pixart.json"
    run(["pixart-ref", "--loss-by-noise", "32", "--threads", "1", "--json", str(pixart)])
    pixart = json.loads(pixart.read_text())["bins"]
    assert all(0 <= r["shape_acc"] <= 1 for r in shipped + fresh + pixart)
    assert low(fresh) < 0.5 < low(shipped) < low(pixart)
    # The same in size: how much the prediction changes when another shape is asked for;
    # the shipped dit-ref learned part of pixart-ref's by distillation (README).
    effect = lambda rows: sum(r["shape_effect"] for r in rows[:3]) / 3  # noqa: E731
    assert effect(fresh) < effect(shipped) < effect(pixart)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (training's bf16 autocast)"))])
def test_dit_ref_distils_from_pixart_ref_on_the_shape_swapped_captions(sample_script, device):
    """`train_reference.py dit-ref --distill-from pixart-ref`: each condition row pairs the
    teacher's caption with the student's class for the same request, and steps on the loss
    move dit-ref toward pixart-ref. On CUDA the steps run under bf16 autocast as training's
    do, and the teacher's targets there must be the CPU's within bf16 rounding (two H200 runs
    of the distillation broke dit-ref where CPU runs improved it: README)."""
    from effgen.models import refdata
    from effgen.models.training import training_pictures

    script = sample_script("train_reference")
    images, attrs = training_pictures(8, 0)
    distill = script.ShapeSwapDistillation("pixart-ref", attrs, 20, device)
    assert distill.rows == len(refdata.SHAPES) + 1
    for i, a in enumerate(attrs):
        for k, shape in enumerate(refdata.SHAPES):
            swapped = dataclasses.replace(a, shape=shape)
            assert distill.caption_text[distill.captions[k, i]] == swapped.caption
            assert distill.labels[k, i] == swapped.class_id
        assert distill.caption_text[distill.captions[-1, i]] == ""
        assert distill.labels[-1, i] == 20  # the null class

    student = build_denoiser(get_spec("dit-ref"))
    student.transformer.load_state_dict(load_file(WEIGHTS_DIR / "dit-ref.safetensors"))
    student.to(device)
    g = torch.Generator().manual_seed(0)
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    picture = torch.arange(8).repeat(5)
    row = torch.arange(5).repeat_interleave(8)
    t = torch.randint(100, 500, (40,), generator=g)
    xt = script.add_noise(script.ddpm_alphas_cumprod(), x0[picture], t,
                          torch.randn(40, 3, 32, 32, generator=g))
    picture, row, t, xt = (v.to(device) for v in (picture, row, t, xt))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    if device == "cuda":
        c = distill.captions[row, picture]
        with torch.no_grad():
            with autocast:
                target = distill.teacher(xt, t.float(), distill.states[c], distill.mask[c])
            target = target.float().cpu()
            exact = distill.teacher.cpu()(xt.cpu(), t.float().cpu(), distill.states[c].cpu(),
                                          distill.mask[c].cpu())  # fp32 on the CPU
            distill.teacher.to(device)
        # bf16 rounding moves it by ~1e-4 (measured under the CPU's autocast); the shape asked
        # for, by 0.01-0.04 (`--loss-by-noise`'s shape effect of pixart-ref)
        assert (target - exact).square().mean() < 2e-3 * exact.square().mean()
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)
    losses = []
    for _ in range(5):
        with autocast:
            loss = distill.loss(student, xt, t, picture, row)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("args,message", [
    (["pixart-ref", "--distill-from", "pixart-ref"], "only dit-ref learns from pixart-ref"),
    (["dit-ref", "--distill-from", "pixart-ref", "--distill-t-max", "0"], "--distill-t-max: a timestep"),
    (["dit-ref", "--distill-from", "pixart-ref", "--distill-batch", "0"], "--distill-batch: at least 1"),
    (["dit-ref", "--cuda-graph"], "--cuda-graph: only with a CUDA --device"),
])
def test_bad_distillation_options_are_one_line_errors(sample_script, capsys, args, message):
    with pytest.raises(SystemExit):
        sample_script("train_reference").main(args)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args,bf16", [([], False), (["--precision", "bf16"], True),
                                       (["--precision", "fp32"], False)])
def test_dit_ref_trains_in_fp32_unless_precision_says_bf16(tmp_path, sample_script, monkeypatch,
                                                           args, bf16):
    """dit-ref's attention logits ran away under bf16 autocast on an H200 and not in fp32
    (README, Reference models), so its default precision is fp32 (on the CPU, where the test
    runs, the loop trains in fp32 either way)."""
    script = sample_script("train_reference")
    configs = []

    def recording_train(model, ema, ema_of, loss_fn, cfg, *rest, **options):
        configs.append(cfg)
        return train(model, ema, ema_of, loss_fn, cfg, *rest, **options)

    monkeypatch.setattr(script, "train", recording_train)
    script.main(["dit-ref", "--steps", "1", "--batch", "2", "--data-size", "8", "--threads", "1",
                 "--out", str(tmp_path / "a.safetensors"), *args])
    assert [c.bf16 for c in configs] == [bf16]
    assert (tmp_path / "a.safetensors").is_file()


def test_dit_ref_distils_from_pixart_ref_on_its_own_samples(sample_script, tmp_path):
    """`train_reference.py dit-ref --distill-from pixart-ref --distill-on own-samples`: the pool
    holds the states of dit-ref's own sampler below --distill-t-max, for the classes in turn;
    each state's null-condition target is pixart-ref's on the empty caption and its asked-shape
    target pixart-ref's on a caption of the asked shape and colour, which the other shapes'
    differ from; drawing the pool leaves the student in training mode, and steps on the loss
    move dit-ref toward pixart-ref on those states."""
    from effgen.models import refdata

    script = sample_script("train_reference")
    student = build_denoiser(get_spec("dit-ref")).train()
    student.transformer.load_state_dict(load_file(WEIGHTS_DIR / "dit-ref.safetensors"))
    states = tmp_path / "caption-states.safetensors"  # encoded once, read back below
    pool = script.OwnSampleDistillation(student, "pixart-ref", 3, seed=0, t_max=500, device="cpu",
                                        caption_states=states)
    assert student.training
    assert len(pool) == 3 * 9 and pool.t[:9].tolist() == list(range(450, 0, -50))
    assert pool.label.tolist() == [0] * 9 + [1] * 9 + [2] * 9
    assert not torch.equal(pool.x[0], pool.x[9])  # each picture its own noise

    index, text, mask = script.caption_table(refdata.all_combinations(), states)
    empty = torch.tensor([index[""]])
    teacher = build_denoiser(get_spec("pixart-ref"))
    teacher.transformer.load_state_dict(load_file(WEIGHTS_DIR / "pixart-ref.safetensors"))
    with torch.no_grad():
        null = teacher(pool.x[:1], pool.t[:1].float(), text[empty], mask[empty])
    torch.testing.assert_close(pool.target[0, 4], null[0], atol=1e-5, rtol=1e-4)
    # state 9 asks for class 1: a circle (shape 0) in colour 1; the targets per shape differ
    per_shape = pool.target[9, :4].flatten(1)
    assert torch.cdist(per_shape, per_shape).triu(1)[0, 1:].min() > 0

    opt = torch.optim.Adam(student.parameters(), lr=1e-4)
    state, other = torch.arange(len(pool)), torch.arange(len(pool)) % 3 + 1
    losses = []
    for _ in range(5):
        loss = pool.loss(student, state, other, guided=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses
