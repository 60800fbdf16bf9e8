"""The default configuration: every field of every group, with Ho et al.'s (2020) values.

This file is the one source of the defaults, and it documents each field; the typed views
that check a config (`ddpm_jax.experiment.config`, `data.DataConfig`, `models.ModelConfig`)
state none of their own. Experiment configs (`configs/*.py`) start from `get_config()` and
change only what differs; a run's config is checked against these groups and fields before
anything compiles. Run one with::

    ddpm-jax train --config=configs/cifar10.py --workdir=workdirs/cifar10
"""

from typing import Any

import ml_collections


def group(which: str, /, **changes: Any) -> dict[str, Any]:
    """The defaults of one group, `get_config()[which]`, as a plain dict with `changes` applied.

    Raises:
      KeyError: `which` is not a group, or a change names a field the group does not have.
    """
    values = get_config()[which].to_dict()
    unknown = sorted(set(changes) - set(values))
    if unknown:
        raise KeyError(f"config.{which} has no field(s) {unknown}.")
    return {**values, **changes}


def get_config() -> ml_collections.ConfigDict:
    """Returns the base configuration (CIFAR-10-sized model, linear schedule, T = 1000)."""
    config = ml_collections.ConfigDict()

    config.data = ml_collections.ConfigDict()
    config.data.name = "cifar10"  # a TFDS dataset name, or "digits" (embedded, offline).
    config.data.split = "train"  # the split to train on (eval.split is the one evaluated).
    config.data.image_size = 32
    config.data.channels = 3
    config.data.random_flip = True
    config.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir.
    config.data.num_workers = 0  # Grain worker processes (0: read in the main process).
    # Where the examples come from: "tfds" (data.name in data.data_dir), "folder" (image
    # files under data.path), "huggingface" (save_to_disk directory, or hf://NAME from the
    # datasets cache), "arrayrecord" (what `ddpm-jax-data prepare` wrote).
    config.data.source = "tfds"
    config.data.path = ml_collections.config_dict.placeholder(str)  # None for "tfds".
    config.data.labels_from_folders = False  # folder: labels = sorted first-level sub-folders.
    # folder / single HF Dataset: fraction held out as split "test" (by a hash of the path).
    config.data.eval_fraction = 0.0
    config.data.image_key = "image"  # huggingface: the image column.
    config.data.label_key = "label"  # huggingface: the label column (None or absent: none).

    config.model = ml_collections.ConfigDict()
    config.model.ch = 128
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.1
    config.model.num_heads = 1
    config.model.resblock_updown = False
    config.model.conv_resample = True
    config.model.out_channels = ml_collections.config_dict.placeholder(int)  # None: data.channels.
    config.model.num_classes = 0  # > 0: class-conditional, with a null class for guidance.
    config.model.dtype = "float32"  # computation dtype: "float32" or "bfloat16".
    config.model.remat = False
    # GroupNorm groups: None: max(1, min(32, C // 2)) for a norm on C channels (Ho et al.'s 32
    # from C = 64 on); an int: that many in every norm (diffusers' norm_num_groups, for
    # imported models: ddpm-jax-import).
    config.model.norm_groups = ml_collections.config_dict.placeholder(int)

    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.schedule = "linear"
    config.diffusion.num_timesteps = 1000
    config.diffusion.beta_start = 1e-4
    config.diffusion.beta_end = 0.02
    config.diffusion.parameterization = "x0"  # the network predicts x_0: "x0" | "eps" | "v".
    # Weight w_t on ||x̂_0 - x_0||²: "elbo" is the true bound (C_t, times T); "eps_mse" is
    # Ho et al.'s L_simple; also "x0_mse", "v_mse", "snr_trunc", "min_snr".
    config.diffusion.weighting = "eps_mse"
    config.diffusion.min_snr_gamma = 5.0
    # Reverse-process variance: "fixedlarge" (β_t) | "fixedsmall" (σ_q²), or predicted by the
    # network: "learned_range" (Nichol & Dhariwal: between the two) | "learned" (log σ²);
    # a learned variance doubles model.out_channels (None follows it).
    config.diffusion.variance = "fixedlarge"
    config.diffusion.clip_denoised = True
    # λ of the bound's term trained next to the weighted MSE of a learned variance (the mean
    # is stop-gradiented in it): 0.001 is L_hybrid. 0 with a fixed variance or "elbo".
    config.diffusion.vlb_weight = 0.0
    # How the training loss draws its timesteps: "uniform", or "loss_aware" (importance
    # sampling on the second moment of each t's last 10 losses, reweighted by 1/(T p_t):
    # unbiased).
    config.diffusion.timestep_proposal = "uniform"
    # What is trained: "ddpm" (the discrete chain of this group's schedule) or "edm" (Karras
    # et al. 2022: the U-Net preconditioned as a denoiser D(x; σ) over continuous σ, trained
    # with config.edm's loss; sampled with sampling.sampler "heun" or "euler"). Under "edm"
    # the DDPM-only fields keep their defaults: weighting, min_snr_gamma (unread), a fixed
    # variance, vlb_weight 0, timestep_proposal "uniform", parameterization "x0",
    # rescale_zero_terminal_snr False.
    config.diffusion.formulation = "ddpm"
    # Rescale the β schedule to zero terminal SNR, ᾱ_T = 0 (Lin et al. 2024): x_T is pure
    # noise. Needs parameterization "v" or "x0" (ε cannot be predicted from pure noise).
    config.diffusion.rescale_zero_terminal_snr = False

    # The EDM formulation's trained fields (diffusion.formulation = "edm" only).
    config.edm = ml_collections.ConfigDict()
    config.edm.sigma_data = 0.5  # σ_d, the data's standard deviation, of the preconditioning.
    config.edm.p_mean = -1.2  # training σ: ln σ ~ N(p_mean, p_std²).
    config.edm.p_std = 1.2

    config.training = ml_collections.ConfigDict()
    config.training.batch_size = 128  # global batch, over all devices and processes.
    config.training.num_train_steps = 800_000
    config.training.log_every_steps = 100
    config.training.checkpoint_every_steps = 5_000
    config.training.keep_checkpoints = 3  # the last K checkpoints...
    config.training.keep_period = 100_000  # ...plus every step divisible by this.
    config.training.sample_every_steps = 20_000
    config.training.num_sample_images = 64  # images in each sample grid written while training.
    config.training.grad_accum_steps = 1
    config.training.seed = 0  # data order, initialisation and every random stream.
    # Resume from this checkpoint step instead of the newest; the newer checkpoints are moved
    # to checkpoints/_quarantine (never deleted). None: the newest that restores.
    config.training.resume_step = ml_collections.config_dict.placeholder(int)
    # True: resume although a field that defines the model, its data or the random streams
    # changed (README, "Resuming"); such changes are recorded in config_history.jsonl.
    config.training.allow_config_change = False
    # Class-conditional models: the fraction of training labels dropped to the null class,
    # which trains the unconditional model of classifier-free guidance (Ho & Salimans: 0.1).
    config.training.label_dropout = 0.1

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 5_000
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.grad_clip_norm = 1.0  # global-norm clipping of the gradient; None: none.
    config.optim.ema_decay = 0.9999
    # EMA decay at step s is min(ema_decay, (1 + s) / (10 + s)), so that the average forgets the
    # initial parameters (zero output layer) within a short run; at 0.9999 the two agree after
    # ~90k steps. False: the constant decay of Ho et al.
    config.optim.ema_warmup = True
    # Post-hoc EMA (Karras et al. 2024, EDM2): power-function EMAs of these relative widths
    # σ_rel (each in (0, 1/√12 ≈ 0.2887]; EDM2 tracks 0.05 and 0.10), kept in the train state
    # beside the EMA above, one float32 copy of the parameters each. () : none.
    config.optim.ema_profiles = ()
    # Every this many steps (and at the last), the power EMAs are saved to ema_snapshots/ and
    # kept; `ddpm-jax ema` reconstructs any σ_rel from them after training. 0: no snapshots.
    config.optim.ema_snapshot_every = 0
    # The EMA as a half-life in thousands of training images (EDM's form; ema_decay and
    # ema_warmup are then unused): β = 0.5^(batch / max(h, 1e-8)) per step, h = 1000 ·
    # ema_halflife_kimg images, or with ema_rampup_ratio r, h = min(h, r · images seen so
    # far). None: the per-step ema_decay above. EDM's CIFAR-10: 500 and 0.05.
    config.optim.ema_halflife_kimg = ml_collections.config_dict.placeholder(float)
    config.optim.ema_rampup_ratio = ml_collections.config_dict.placeholder(float)

    config.sampling = ml_collections.ConfigDict()
    # "ancestral" (Ho et al.), "ddim" (Song et al.), or the multistep ODE solvers
    # "dpm_solver++" (Lu et al.) and "unipc" (Zhao et al.), for chains of 10-20 steps (DDPM
    # models only); "heun" and "euler": EDM's samplers on Karras σ's (Karras et al. 2022,
    # Algorithm 2), for EDM models and for DDPM ones (in σ_t = √((1-ᾱ_t)/ᾱ_t)).
    config.sampling.sampler = "ancestral"
    # 0: all T steps (heun/euler: EDM's 18); fewer: a respaced chain of that many.
    config.sampling.num_steps = 0
    # Which num_steps timesteps: "endpoints" (keeps 0 and T-1), "even" (Nichol & Dhariwal),
    # "linspace", "leading", "trailing" (diffusers'), "logsnr" (even in log-SNR: the best
    # for the solvers at 10-20 steps). See ddpm_jax/timesteps.py.
    config.sampling.timestep_spacing = "endpoints"
    config.sampling.order = 2  # 1, 2 or 3: the order of "dpm_solver++" and "unipc".
    config.sampling.eta = 0.0  # DDIM only.
    config.sampling.num_samples = 50_000
    config.sampling.batch_size = 256  # images per chunk, over all devices.
    config.sampling.seed = 42
    # Classifier-free guidance w (class-conditional models only): 1 is the conditional model.
    config.sampling.guidance_scale = 1.0
    # "heun"/"euler": the Karras grid σ_i = (σ_max^(1/ρ) + i/(N-1) (σ_min^(1/ρ) -
    # σ_max^(1/ρ)))^ρ, then 0. None: the model's range (EDM: 0.002 and 80; a DDPM model: its
    # σ_t at t = 0 and T - 1, which a given value must lie within).
    config.sampling.sigma_min = ml_collections.config_dict.placeholder(float)
    config.sampling.sigma_max = ml_collections.config_dict.placeholder(float)
    config.sampling.rho = 7.0
    # "heun"/"euler": EDM's stochastic churn γ_i = min(s_churn / N, √2 - 1) on s_min <= σ_i
    # <= s_max (None: ∞), with noise of std s_noise; s_churn = 0: the deterministic ODE.
    config.sampling.s_churn = 0.0
    config.sampling.s_min = 0.0
    config.sampling.s_max = ml_collections.config_dict.placeholder(float)
    config.sampling.s_noise = 1.0

    config.eval = ml_collections.ConfigDict()
    config.eval.split = "test"
    config.eval.batch_size = 256
    config.eval.bpd_timestep_chunk = 50  # timesteps evaluated at once in the full bound.
    config.eval.num_examples = 0  # 0: the whole split.
    config.eval.fid_num_samples = 50_000
    config.eval.inception_weights = ml_collections.config_dict.placeholder(str)  # path or URL.
    config.eval.inception_sha256 = ml_collections.config_dict.placeholder(str)
    # FID reference statistics (and converted weights) cache; None: ~/.cache/ddpm_jax/fid.
    config.eval.fid_cache_dir = ml_collections.config_dict.placeholder(str)
    # Images of the reference split ("train" or "test" below) for its statistics; 0: all.
    config.eval.fid_reference_examples = 0
    # The seeds of the sample sets of FID, sFID, IS, precision and recall: one set of
    # fid_num_samples images per seed (key PRNGKey(seed), the images `--mode=sample` draws
    # with that seed); each seed is reported, with the mean ± std and the minimum over seeds
    # (EDM reports the minimum of 3). None: (sampling.seed,), one set.
    config.eval.fid_seeds = ml_collections.config_dict.placeholder(tuple)
    # What the samples are compared with: "train" (config.data.split: Ho et al.'s FID 3.17 is
    # against the training set), "test" (config.eval.split) or "file" (eval.reference_file).
    config.eval.fid_reference = "train"
    # A published reference .npz, read as published (fid_reference = "file"): guided-diffusion's
    # (ADM) batches (arr_0 uint8 images; mu, sigma, mu_s, sigma_s) or EDM's statistics (mu,
    # sigma: FID only). Its SHA-256 is recorded, and checked against reference_sha256 if set.
    config.eval.reference_file = ml_collections.config_dict.placeholder(str)
    config.eval.reference_sha256 = ml_collections.config_dict.placeholder(str)
    # The likelihood of --mode=eval: "bound" (the full T-step DDPM bound), "ode" (log p(x) by the
    # probability-flow ODE, dequantized) or "both". None: "bound" for DDPM models, "ode" for EDM
    # ones (which have no discrete bound).
    config.eval.likelihood = ml_collections.config_dict.placeholder(str)
    # The ODE likelihood: divergence "hutchinson" (Rademacher probes) or "exact" (dim JVPs per
    # evaluation: small images only), probes per example, the adaptive solver ("dopri5" |
    # "tsit5") and its tolerances (score_sde: 1e-5), and the uniform dequantization's bins:
    # "score_sde" (width 2/256: bits/dim comparable with score_sde's tables) or "centred"
    # (width 2/255 around the training grid). See ddpm_jax/likelihood/ode.py.
    config.eval.ode_trace = "hutchinson"
    config.eval.ode_num_probes = 1
    config.eval.ode_solver = "dopri5"
    config.eval.ode_rtol = 1e-5
    config.eval.ode_atol = 1e-5
    config.eval.ode_dequantization = "score_sde"
    # The parameters that sampling and evaluation use: None, the checkpoint's EMA (optim.
    # ema_decay); or the name of a post-hoc EMA that `ddpm-jax ema` wrote to <workdir>/emas/.
    config.eval.ema = ml_collections.config_dict.placeholder(str)

    config.mesh = ml_collections.ConfigDict()
    config.mesh.fsdp = False  # shard parameters and optimizer state over the data axis.
    config.mesh.fsdp_min_size = 2**18  # with fsdp: leaves smaller than this stay replicated.

    return config
