"""DPM-Solver++ and UniPC: step for step equal to diffusers, exact orders on Gaussian data."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import sampling, schedules, timesteps

GOLDEN = np.load(os.path.join(os.path.dirname(__file__), "golden", "solvers.npz"))
T = 1000
SCHED = schedules.make_schedule(schedules.get_beta_schedule("linear", T))
PREDICTION = {"sample": "x0", "epsilon": "eps", "v_prediction": "v"}
CASES = sorted({k.split("/")[0] for k in GOLDEN.files if k.count("/") == 1})


def linear_model(prediction):
    """The golden files' model: prediction = a[t] x_t + b[t], float32 as in torch."""
    a = jnp.asarray(GOLDEN[f"coef_{prediction}_a"])
    b = jnp.asarray(GOLDEN[f"coef_{prediction}_b"])
    return lambda x, t: a[t][:, None] * x + b[t][:, None]


def test_the_golden_files_share_our_schedule():
    np.testing.assert_array_equal(GOLDEN["alphas_cumprod"], np.asarray(SCHED.alphas_cumprod))
    assert len(CASES) == 10


@pytest.mark.parametrize("case", CASES)
def test_solvers_match_diffusers_step_for_step(case):
    kind, prediction = case.split("_")[0], case.split("_")[1]
    sampler = "dpm_solver++" if kind.startswith("dpmpp") else "unipc"
    order = int(kind[-1])
    prediction = {"sample": "sample", "eps": "epsilon", "v": "v_prediction"}[prediction]
    ts = GOLDEN[f"{case}/timesteps"]
    x_T = jnp.asarray(GOLDEN[f"{case}/x_T"])
    want = GOLDEN[f"{case}/steps"]
    chain = sampling.reverse_chain(
        linear_model(prediction), SCHED, x_T.shape, jax.random.PRNGKey(0),
        parameterization=PREDICTION[prediction], clip_denoised=False, sampler=sampler,
        order=order, timesteps=np.sort(ts),
    )  # fmt: skip
    state = chain.init(x_T)
    run = jax.jit(lambda s, j: chain.run(s, j, 1))
    for k in range(len(ts)):
        state = run(state, k)
        np.testing.assert_allclose(np.asarray(state.x), want[k], rtol=1e-5, atol=1e-5,
                                   err_msg=f"{case}, step {k} (t = {ts[k]})")  # fmt: skip
    # The one-scan sampler gives the same samples (clipped to [-1, 1]).
    samples = sampling.sample(
        linear_model(prediction), SCHED, x_T.shape, jax.random.PRNGKey(0),
        parameterization=PREDICTION[prediction], clip_denoised=False, sampler=sampler,
        order=order, timesteps=np.sort(ts), x_T=x_T,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(samples), np.clip(want[-1], -1, 1), atol=1e-5)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_spacings_match_diffusers(spacing):
    for key in [k for k in GOLDEN.files if k.startswith(f"spacing/{spacing}/")]:
        K = int(key.split("/")[-1])
        np.testing.assert_array_equal(
            timesteps.spaced_timesteps(T, K, spacing), np.sort(GOLDEN[key]), err_msg=key
        )


def test_even_spacing_is_nichol_and_dhariwals_with_their_rounding():
    even = timesteps.spaced_timesteps(T, 7, "even")
    assert even.tolist() == [0, 166, 333, 500, 666, 832, 999]
    assert timesteps.spaced_timesteps(T, 7, "endpoints").tolist() == [
        0, 167, 333, 500, 666, 833, 999,
    ]  # fmt: skip
    differ = [
        K
        for K in range(2, T + 1)
        if not np.array_equal(
            timesteps.spaced_timesteps(T, K, "even"), timesteps.spaced_timesteps(T, K)
        )
    ]
    assert len(differ) == 298
    assert timesteps.spaced_timesteps(T, 1, "even").tolist() == [0]
    assert timesteps.spaced_timesteps(T, 1).tolist() == [T - 1]  # the default: from noise.


@pytest.mark.parametrize("parameterization", ["x0", "eps", "v"])
def test_dpm_solver_order_one_is_ddim(parameterization):
    model = linear_model({"x0": "sample", "eps": "epsilon", "v": "v_prediction"}[parameterization])
    x_T = jax.random.normal(jax.random.PRNGKey(1), (5, 6))
    kw = dict(parameterization=parameterization, x_T=x_T, num_steps=13, clip_denoised=True)
    ddim = sampling.sample(model, SCHED, x_T.shape, jax.random.PRNGKey(0), sampler="ddim", **kw)
    dpm1 = sampling.sample(
        model, SCHED, x_T.shape, jax.random.PRNGKey(0), sampler="dpm_solver++", order=1, **kw
    )
    np.testing.assert_allclose(np.asarray(dpm1), np.asarray(ddim), atol=2e-5)


MEAN, STD = 0.3, 0.5


def exact_ode_endpoint(x_T):
    """Where the probability-flow ODE takes x_T for data N(MEAN, STD² I): closed form."""
    a = float(SCHED.alphas_cumprod[-1])
    return MEAN + STD * (x_T - np.sqrt(a) * MEAN) / np.sqrt(a * STD**2 + 1 - a)


def endpoint_error(sampler, K, order=2):
    model = linear_model("epsilon")  # the exact denoiser of N(MEAN, STD² I), as ε̂.
    x_T = jax.random.normal(jax.random.PRNGKey(2), (64, 8))
    chain = sampling.reverse_chain(
        model, SCHED, x_T.shape, jax.random.PRNGKey(0), parameterization="eps",
        clip_denoised=False, sampler=sampler, order=order if sampler != "ddim" else 2,
        num_steps=K, timestep_spacing="logsnr",
    )  # fmt: skip
    x = chain.run(chain.init(x_T), 0, K).x  # unclipped: the endpoint leaves [-1, 1].
    return float(np.max(np.abs(np.asarray(x) - exact_ode_endpoint(np.asarray(x_T)))))


@pytest.mark.parametrize(
    "sampler, order, rate",
    [("ddim", 2, 1.6), ("dpm_solver++", 2, 3.0), ("dpm_solver++", 3, 4.5), ("unipc", 2, 3.0)],
)
def test_error_shrinks_at_the_solver_order_on_the_exact_gaussian_ode(sampler, order, rate):
    errors = [endpoint_error(sampler, K, order) for K in (20, 40, 80)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] / errors[1] > rate and errors[1] / errors[2] > rate, errors


def test_dpm_solver_2m_at_ten_steps_is_far_more_accurate_than_ddim():
    ddim, dpm2 = endpoint_error("ddim", 10), endpoint_error("dpm_solver++", 10)
    assert dpm2 < ddim / 5, (ddim, dpm2)


def test_one_compiled_program_serves_every_spacing_of_the_same_length():
    from ddpm_jax.experiment.chain_program import ChainProgram

    del ChainProgram  # see tests/test_generate.py for the Sampler-level check.
    model = linear_model("epsilon")
    x_T = jnp.zeros((2, 3))

    def run(sub, ts):
        chain = sampling.ReverseChain(model, sub, ts, T, x_T.shape, jax.random.PRNGKey(0),
                                      sampler="dpm_solver++", parameterization="eps")  # fmt: skip
        return chain.result(chain.run(chain.init(), 0, chain.num_steps))

    jitted = jax.jit(run)
    for spacing in ("linspace", "trailing", "even", "leading"):
        ts = timesteps.spaced_timesteps(T, 10, spacing)
        jitted(timesteps.respaced_schedule(SCHED, ts), jnp.asarray(ts, jnp.int32))
    assert jitted._cache_size() == 1


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(sampler="dpm_solver++", order=4), r"order must be an int in \[1, 3\]"),
        (dict(sampler="unipc", order=0), r"order must be an int in \[1, 3\]"),
        (dict(sampler="ancestral", order=3), "order=3 applies to"),
        (dict(sampler="dpm_solver++", eta=0.5), "eta=0.5 applies to sampler='ddim' only"),
        (dict(num_steps=10, timestep_spacing="uniform"), "Unknown timestep spacing 'uniform'"),
        (dict(num_steps=1000, timestep_spacing="leading"), "gives .* distinct timesteps"),
    ],
)
def test_bad_solver_arguments_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        sampling.sample(linear_model("epsilon"), SCHED, (2, 3), jax.random.PRNGKey(0), **kw)
