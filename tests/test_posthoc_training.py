"""Post-hoc EMA in a training run: the power EMAs in the train state, their snapshots, resume,
`ddpm-jax ema`, named EMAs for sampling and evaluation, the σ_rel sweep."""

import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from numerics import assert_f32_close

import ddpm_jax
from configs import tiny
from ddpm_jax import errors, posthoc_ema, train
from ddpm_jax.ema import command, plot, sweep
from ddpm_jax.ema import reconstruct as rc
from ddpm_jax.evaluation import bpd as bpd_lib
from ddpm_jax.evaluation import evaluate
from ddpm_jax.experiment import ExperimentConfig
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import sharding as shd
from ddpm_jax.runtime.checkpointing import named_emas, snapshots
from ddpm_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROFILES = (0.05, 0.10, 0.07)  # EDM2's two, and a third tracked to compare with.
STEPS, EVERY, CKPT = 12, 2, 6


def config(profiles=PROFILES, every=EVERY, **training):
    c = tiny.get_config()
    c.training.update(num_train_steps=STEPS, checkpoint_every_steps=CKPT, keep_checkpoints=5,
                      sample_every_steps=0, log_every_steps=12)  # fmt: skip
    c.training.update(training)
    c.optim.ema_profiles = profiles
    c.optim.ema_snapshot_every = every
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """12 steps with three profiles, snapshots every 2 steps, checkpoints at 6 and 12."""
    workdir = str(tmp_path_factory.mktemp("posthoc") / "w")
    return workdir, loop.train(config(), workdir)


@pytest.fixture
def workdir(run, tmp_path):
    path = str(tmp_path / "w")
    shutil.copytree(run[0], path)
    return path


def host(tree):
    return jax.tree.map(np.asarray, tree)


def assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def rel_err(a, b):
    """‖a − b‖ / ‖b‖ over all leaves, in float64."""
    sq = [(np.float64(x) - np.float64(y), np.float64(y)) for x, y in
          zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]  # fmt: skip
    return math.sqrt(sum(np.sum(d**2) for d, _ in sq) / sum(np.sum(y**2) for _, y in sq))


def tracked(workdir, step):
    """The power EMAs of the checkpoint at `step`, on the host."""
    trees, _ = checkpointing.restore_subtree(workdir, "power_emas", step=step)
    return [host(t) for t in trees]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("profiles", "every", "match"),
    [
        ((0.05, 0.3), 0, r"optim\.ema_profiles = \(0\.05, 0\.3\): must be a tuple of finite"),
        ((0.0,), 0, r"optim\.ema_profiles"),
        ((0.05, 0.05), 0, "lists a σ_rel twice"),
        (("0.05",), 0, r"optim\.ema_profiles"),
        ((), 100, r"optim\.ema_snapshot_every = 100: .*ema_profiles, which is empty"),
        ((0.05,), -1, r"optim\.ema_snapshot_every = -1"),
    ],
)
def test_bad_profiles_and_cadences_are_refused_naming_the_field(profiles, every, match):
    with pytest.raises(errors.ConfigError, match=match):
        ExperimentConfig.from_config(config(profiles, every))


def test_the_largest_sigma_rel_is_the_uniform_average_and_names_are_checked():
    parsed = ExperimentConfig.from_config(config((posthoc_ema.SIGMA_REL_MAX, 0.1), 0))
    assert parsed.optim.ema_profiles == (posthoc_ema.SIGMA_REL_MAX, 0.1)
    c = config()
    for bad in ("../x", ".hidden", "a b", ""):
        c.eval.ema = bad
        with pytest.raises(errors.ConfigError, match=r"config\.eval\.ema"):
            ExperimentConfig.from_config(c)


def test_the_state_layout_with_and_without_profiles_and_with_the_loss_aware_proposal():
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    fields = {}
    for name, profiles, proposal in [("off", (), "uniform"), ("on", PROFILES, "uniform"),
                                     ("both", (0.05, 0.1), "loss_aware")]:  # fmt: skip
        c = config(profiles, 0)
        c.diffusion.timestep_proposal = proposal
        setup = train.build(c, mesh)
        fields[name] = (type(setup.abstract), list(setup.abstract.__dataclass_fields__))
        if profiles:  # one float32 copy of the parameters per profile, laid out like them.
            assert len(setup.abstract.power_emas) == len(profiles)
            for e in setup.abstract.power_emas:
                assert jax.tree.structure(e) == jax.tree.structure(setup.abstract.params)
                for a, p in zip(jax.tree.leaves(e), jax.tree.leaves(setup.abstract.params),
                                strict=True):  # fmt: skip
                    assert a.shape == p.shape and a.dtype == np.float32
                    assert a.sharding == p.sharding
        if proposal == "loss_aware":  # the step updates both fields (traced, not compiled).
            state = jax.eval_shape(setup.init_fn, jax.random.PRNGKey(0))
            batch = {"image": jax.ShapeDtypeStruct((8, 8, 8, 1), np.float32),
                     "label": jax.ShapeDtypeStruct((8,), np.int32)}  # fmt: skip
            out, _ = jax.eval_shape(train.make_train_step(setup.experiment, setup.optimizer),
                                    state, batch)  # fmt: skip
            assert jax.tree.structure(out) == jax.tree.structure(state)
    assert fields["off"] == (train.TrainState, ["step", "params", "ema_params", "opt_state"])
    assert fields["on"] == (train.PowerEMATrainState, [*fields["off"][1], "power_emas"])
    cls, names = fields["both"]
    assert cls is train.LossAwarePowerEMATrainState and issubclass(cls, train.LossAwareTrainState)
    assert names == [*fields["off"][1], "timestep_sampler", "power_emas"]


# --------------------------------------------------------------------------- training


def test_the_run_tracks_the_profiles_and_snapshots_them(run):
    workdir, state = run
    assert isinstance(state, train.PowerEMATrainState) and len(state.power_emas) == 3
    found = snapshots.list_snapshots(workdir)
    assert [s.step for s in found] == list(range(EVERY, STEPS + 1, EVERY))
    assert all(s.sigma_rels == PROFILES for s in found)
    # The last snapshot and the last checkpoint hold the state's power EMAs exactly.
    for trees in (snapshots.load_snapshot(workdir, STEPS), tracked(workdir, STEPS)):
        assert_trees_equal(trees, state.power_emas)
    # A snapshot is one float32 copy of the parameters per profile.
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    size = sum(
        os.path.getsize(os.path.join(root, f))
        for root, _, names in os.walk(os.path.join(snapshots.snapshot_dir(workdir), str(STEPS)))
        for f in names
    )
    assert size < 4 * num_params * 3 + 100_000  # (orbax compresses: a little less.)


def test_without_profiles_the_checkpoints_keep_their_layout_and_values(workdir, tmp_path):
    """Profiles off: the state and checkpoints of today, and no snapshot directory; profiles
    on change none of the other values (float32-close; bit-identical on the CPUs seen)."""
    off = str(tmp_path / "off")
    state = loop.train(config((), 0, num_train_steps=CKPT), off)
    assert type(state) is train.TrainState
    assert not os.path.exists(snapshots.snapshot_dir(off))
    with pytest.raises(KeyError, match=r"fields: \['ema_params', 'opt_state', 'params', 'step'\]"):
        checkpointing.restore_subtree(off, "power_emas")
    with checkpointing.Checkpointer(workdir, save_every_steps=CKPT) as ckpt:
        with_profiles, _ = ckpt.restore(train.build(config(), shd.make_mesh()).abstract, CKPT)
    for field in ("params", "ema_params", "opt_state"):
        for a, b in zip(jax.tree.leaves(getattr(with_profiles, field)),
                        jax.tree.leaves(getattr(state, field)), strict=True):  # fmt: skip
            assert_f32_close(a, b)


def test_resume_with_profiles_is_bit_identical_and_sets_later_snapshots_aside(run, workdir):
    reference_dir, reference = run
    directory = snapshots.snapshot_dir(workdir)
    # A half-written snapshot and an empty step directory, as a killed run leaves them.
    os.makedirs(os.path.join(directory, "14.orbax-checkpoint-tmp"))
    os.makedirs(os.path.join(directory, "16"))
    # Rolled back to step 6 (no step runs): the snapshots after it leave the trajectory.
    loop.train(config(resume_step=CKPT, num_train_steps=CKPT), workdir)
    assert [s.step for s in snapshots.list_snapshots(workdir)] == [2, 4, 6]
    aside = os.listdir(os.path.join(directory, "_quarantine"))
    assert sorted(int(a.split("-")[0]) for a in aside) == [8, 10, 12, 16]
    assert not any("tmp" in n for n in os.listdir(directory))
    # Continued to step 12: the state and every snapshot as in the run that did it at once.
    resumed = loop.train(config(resume_step=CKPT), workdir)
    assert_trees_equal(resumed, reference)
    steps = [s.step for s in snapshots.list_snapshots(workdir)]
    assert steps == [s.step for s in snapshots.list_snapshots(reference_dir)]
    for s in steps:
        assert_trees_equal(snapshots.load_snapshot(workdir, s),
                           snapshots.load_snapshot(reference_dir, s))  # fmt: skip


def test_changed_profiles_are_refused_on_resume_in_one_line(workdir, caplog):
    with pytest.raises(errors.ConfigError) as info:
        loop.train(config((0.05, 0.10)), workdir)
    message = str(info.value)
    assert "optim.ema_profiles ([0.05, 0.1, 0.07] -> [0.05, 0.1])" in message
    assert "\n" not in message and "allow_config_change" in message
    with caplog.at_level(logging.WARNING):  # the cadence may change (warned).
        loop.train(config(every=4), workdir)
    assert any("optim.ema_snapshot_every (2 -> 4)" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- reconstruction


@pytest.mark.parametrize("step", [CKPT, STEPS])
def test_the_reconstruction_equals_the_directly_tracked_profile(run, step):
    """0.07 from the snapshots of 0.05 and 0.10 against 0.07 tracked in the same run.

    With a snapshot every 2 steps the 2·step/2 snapshot weights span all `step` steps, so the
    least squares is exact (weight error ~1e-8) and what is left is float32: the rounding of
    the tracked EMAs over the steps (~1e-6, tests/test_posthoc_ema.py) times Σ|c|. Any slip
    of the step convention (t = state.step + 1) or of a snapshot's profile would show at the
    1e-3 level of the distance between the profiles. The least-squares regime (sparse
    snapshots, ‖δw‖ > 0) is held by the synthetic trajectories of tests/test_posthoc_ema.py
    and by the digits model (the slow test below).
    """
    workdir, _ = run
    p = rc.plan(workdir, 0.07, step, from_profiles=(0.05, 0.10))
    assert p.step == step and len(p.snapshots) == step and p.weight_error < 1e-6
    assert {s for _, s in p.snapshots} == {0.05, 0.10}
    direct = tracked(workdir, step)
    err = rel_err(rc.reconstruct(workdir, p), direct[2])
    assert err < 1e-5 * max(1.0, p.sum_abs)
    assert err < 1e-3 * rel_err(direct[0], direct[2])  # far closer than the neighbour profile.


def test_off_grid_steps_and_untracked_profiles_are_refused(run):
    workdir, _ = run
    with pytest.raises(
        errors.ConfigError, match=r"--step=7 is not a snapshot step \(nearest: 6, 8"
    ):
        rc.plan(workdir, 0.07, 7)
    with pytest.raises(errors.ConfigError, match=r"hold the profiles 0\.05, 0\.07, 0\.1 only"):
        rc.plan(workdir, 0.07, from_profiles=(0.2,))
    with pytest.raises(errors.ConfigError, match=r"not in \(0, 1/sqrt\(12\)"):
        rc.plan(workdir, 0.3)
    with pytest.raises(errors.WorkdirNotFoundError, match="holds no EMA snapshots"):
        rc.plan(os.path.dirname(workdir), 0.07)


def test_the_ema_command_writes_named_emas_for_sampling_and_evaluation(
    workdir, capsys, monkeypatch
):
    names = command.run(None, workdir, [0.07, 0.2], from_profiles=(0.05, 0.10))
    assert names == ["sigma_rel_0.07_step_12", "sigma_rel_0.2_step_12"]
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == names
    assert "sum|c|=" in out[0] and "weight_error=" in out[0]
    assert named_emas.list_named_emas(workdir) == names
    meta = named_emas.read_metadata(workdir, names[0])
    assert meta["sigma_rel"] == 0.07 and meta["step"] == STEPS and len(meta["coefficients"]) == 12
    p = rc.plan(workdir, 0.07, from_profiles=(0.05, 0.10))
    np.testing.assert_array_equal(meta["coefficients"], p.coefficients)
    model = ddpm_jax.load_sampler(workdir, ema=names[0])
    assert model.ema == names[0] and model.step == STEPS
    assert_trees_equal(model.params, rc.reconstruct(workdir, p))
    default = ddpm_jax.load_sampler(workdir)
    assert default.ema == "ema_params" and default.step == STEPS
    with pytest.raises(errors.WorkdirError, match="average at step 12, not 6"):
        ddpm_jax.load_sampler(workdir, ema=names[0], step=CKPT)
    with pytest.raises(errors.WorkdirNotFoundError, match=r"there are: sigma_rel_0\.07_step_12"):
        ddpm_jax.load_sampler(workdir, ema="sigma_rel_0.3_step_12")
    # The evaluation selects it and records it (the bound itself is tested elsewhere).
    chosen = []

    def bound(model):
        chosen.append((model.ema, model.step, model.params))
        return bpd_lib.BitsPerDimResult(8, 1.0, 0.25, 0.75, 0.0, np.zeros(100))

    monkeypatch.setattr(evaluate.bpd_lib, "split_bits_per_dim", bound)
    c = config()
    c.eval.update(num_examples=8, fid_num_samples=0, ema=names[0])
    results = evaluate.evaluate(c, workdir)
    assert chosen[0][:2] == (names[0], STEPS)
    assert_trees_equal(chosen[0][2], model.params)
    assert results["ema"] == names[0] and np.isfinite(results["bpd"])
    saved = os.path.join(workdir, "eval", f"bpd_step{STEPS}_{names[0]}.json")
    assert json.load(open(saved))["ema"] == names[0]


def test_the_sweep_evaluates_each_sigma_rel_and_marks_the_exponential_ema(workdir, capsys):
    c = config()
    c.eval.update(num_examples=8, batch_size=8)
    command.run(c, workdir, [0.05, 0.1], sweep="bpd_estimate")
    printed = capsys.readouterr().out
    assert "exponential EMA of the checkpoint (ema_decay 0.9)" in printed
    path = os.path.join(workdir, "eval", f"ema_sweep_step{STEPS}_bpd_estimate.json")
    result = json.load(open(path))
    assert [q["sigma_rel"] for q in result["points"]] == [0.05, 0.1]
    assert all(np.isfinite(q["value"]) for q in result["points"])
    assert np.isfinite(result["exponential"]["value"])
    from PIL import Image

    assert Image.open(result["png"]).size == (plot.WIDTH, plot.HEIGHT)
    assert named_emas.list_named_emas(workdir) == []  # a sweep writes no named EMA.


def test_the_sigma_rel_of_the_exponential_ema_is_that_of_its_weights():
    """The EMA of the unit vectors θ_i = e_i (θ_0 the initial parameters) is its weights."""
    cfg = ExperimentConfig.from_config(config()).optim
    for warmup in (True, False):
        optim = dataclasses.replace(cfg, ema_decay=0.99, ema_warmup=warmup)
        t = 500
        ema, decay = np.eye(t + 1)[0], train.make_ema_decay_fn(optim)
        for s in range(t):
            d = float(decay(s))
            ema = d * ema + (1 - d) * np.eye(t + 1)[s + 1]
        x = np.arange(t + 1) / t
        std = math.sqrt(ema @ (x - ema @ x) ** 2)
        assert sweep.exponential_sigma_rel(optim, t) == pytest.approx(std, rel=1e-4)


def test_the_plot_ticks_are_round():
    np.testing.assert_allclose(plot.nice_ticks(0.013, 0.25), [0.05, 0.1, 0.15, 0.2, 0.25])
    np.testing.assert_allclose(plot.nice_ticks(4.98, 5.31), [5.0, 5.1, 5.2, 5.3])


def test_the_command_line_refuses_in_one_line():
    from ddpm_jax import main

    assert main.SWEEP_METRICS == sweep.METRICS and "ema" in main.MODES
    out = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.ema", "--workdir=/nonexistent", "--sigma_rel=0.05,x"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "error: --sigma_rel=0.05,x: expected numbers such as 0.05,0.10."
    )


# --------------------------------------------------------------------------- digits (slow)


@pytest.mark.slow
def test_a_reconstructed_profile_of_the_digits_model_equals_the_tracked_one(tmp_path):
    """The digits model, 600 steps, snapshots of 0.05 and 0.10 every 25 steps (24 each):
    0.07 reconstructed from them against 0.07 tracked in the same run, to a relative
    parameter error ≤ 1e-3 (the accuracy of tests/test_posthoc_ema.py, whose weight errors
    are of the same size as these: about 2e-3)."""
    from configs import digits

    c = digits.get_config()
    c.training.update(num_train_steps=600, checkpoint_every_steps=600, sample_every_steps=0,
                      log_every_steps=100)  # fmt: skip
    c.optim.ema_profiles = PROFILES
    c.optim.ema_snapshot_every = 25
    workdir = str(tmp_path / "digits")
    loop.train(c, workdir)
    p = rc.plan(workdir, 0.07, from_profiles=(0.05, 0.10))
    assert p.weight_error < 3e-3
    direct = tracked(workdir, 600)
    err = rel_err(rc.reconstruct(workdir, p), direct[2])
    assert err <= 1e-3 and err < 0.1 * rel_err(direct[0], direct[2])
