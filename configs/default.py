"""Defaults shared by every recipe; each file in configs/ edits a copy of these."""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Another run's workdir (or one of its checkpoint step folders) to take params and EMA from;
  # the optimizer starts fresh. Empty: start from random initialisation.
  config.init_from = ''
  # The training objective: dpm (ADM's diffusion loss), cd (consistency distillation from
  # config.teacher) or ct (consistency training; ECT when started from a DPM via init_from).
  config.objective = 'dpm'
  # cd: the workdir of a DPM run of this project (its EMA params, read-only). The student
  # starts as the teacher unless init_from says otherwise.
  config.teacher = ''

  config.data = data = ml_collections.ConfigDict()
  data.name = 'digits'          # digits | npz | folder | a tfds name (cifar10, imagenet_resized/64x64)
  data.path = ''                # npz file or image folder
  data.tfds_data_dir = ''       # tfds data_dir; empty = tfds default
  data.split = 'train'
  data.image_size = 8
  data.channels = 1
  data.random_flip = False
  data.verify_images = True     # folder: decode every file once before training
  data.skip_unreadable = False  # folder: leave unreadable files out (and say how many)

  config.model = model = ml_collections.ConfigDict()
  model.ch = 32
  model.ch_mult = (1, 2)
  model.num_res_blocks = 1
  model.attn_resolutions = (4,)
  model.num_heads = 4
  model.num_head_channels = -1
  model.dropout = 0.0
  model.learn_sigma = True
  model.resblock_updown = True
  model.use_scale_shift_norm = True
  model.num_heads_upsample = -1  # heads of the decoder's attention blocks; -1 = num_heads
  model.num_classes = 0         # > 0: class-conditional on the data's labels
  model.dtype = 'float32'       # compute dtype: float32 | bfloat16 (params are always float32)
  # The network sees t * timestep_scale; improved-diffusion's rescale_timesteps: 1000 / T.
  model.timestep_scale = 1.0
  # Recompute in the backward pass to save memory: none | attention | blocks (every residual
  # and attention block; guided-diffusion's use_checkpoint). Same values either way.
  model.remat = 'none'

  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.num_timesteps = 1000
  diffusion.schedule = 'cosine'  # linear | cosine
  diffusion.rescale_vb = True    # VB term times T/1000, as ADM's rescale_learned_sigmas

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 64       # global, over all devices and hosts
  training.num_steps = 1000      # minibatches (the data position); see adv.steps for updates
  training.lr = 2e-4
  training.warmup_steps = 0      # optimizer updates
  training.weight_decay = 0.0
  training.grad_clip = 0.0       # global-norm clip; 0 disables
  training.ema_rates = (0.999,)
  training.timestep_sampler = 'uniform'  # uniform | loss_second_moment
  training.log_every = 50        # minibatches
  training.checkpoint_every = 500
  training.keep_checkpoints = 3
  training.sample_every = 1000   # minibatches; 0 disables the sample grid
  training.num_samples = 64      # images in the sample grid
  training.sample_steps = 100    # steps of the grid: ancestral (consistency for cd, ct)
  training.multi_host = False    # call jax.distributed.initialize()
  # A minibatch with a non-finite loss or gradient is skipped (all its updates); this many
  # in a row stop the run (its last checkpoint is kept); 0: skip them and go on.
  training.stop_after_nonfinite = 100
  # An update whose global norm is above this multiple of the params' norm is divergence,
  # finite or not (lr far too high): the run stops at that minibatch and keeps its last
  # good checkpoint; 0: off. Adam's first updates, its largest, are about lr / rms(params):
  # 0.02 of the params at lr 1e-3 on the quickstart U-Net.
  training.max_update_ratio = 1.0
  # A jax.profiler trace of minibatches [first, first + count) into WORKDIR/profile, for
  # TensorBoard's profile plugin (or Perfetto); (0, 0): none.
  training.profile = (0, 0)
  # Minibatches run by one compiled call (a scan inside the program): the host dispatches
  # the whole train state once per call, which matters on a fast accelerator (an ADM's
  # ~2,000 arrays cost milliseconds a call). Same training for any value; log, checkpoint,
  # sample and stop points fall on call boundaries (make the intervals multiples of it, or
  # a shorter call is compiled once to reach them).
  training.minibatches_per_call = 1

  # Adversarial training (the paper's method). method=none is standard training.
  config.adv = adv = ml_collections.ConfigDict()
  adv.method = 'none'            # none | free | pgd | fgsm
  adv.norm = 'l2'                # l2 | linf
  adv.steps = 3                  # K: free replays / pgd ascent steps (fgsm uses 1)
  adv.step_size = 0.1            # alpha, in the units of step_size_scale
  adv.step_size_scale = 'absolute'  # absolute: the norm's own units (the reference's 0.1 on
                                 # CIFAR-10); per_dim: per-pixel RMS, l2 step alpha * sqrt(H*W*C)
  adv.radius = 0.1               # eta, in the units of radius_scale
  adv.radius_scale = 'per_dim'   # per_dim: l2 radius = eta * sqrt(H*W*C); absolute: eta as is
  # constant: the same ball at every t (the paper's); sigma: radius and step size times
  # sigma_t, so the target's shift delta / sigma_t is at most eta per pixel at every t.
  adv.radius_schedule = 'constant'
  adv.init = 'zero'              # zero | uniform (random start inside the ball)
  adv.target = 'delta_detach'    # original | delta | delta_detach
  adv.t_range = (0, -1)          # perturb timesteps t_min <= t <= t_max; -1 = the last one
  # How the K passes compile: unrolled (K copies, fastest on CPU) | rolled (one loop body,
  # ~K times less compile time) | auto (unrolled on CPU, rolled on GPU and TPU and past 16
  # passes).
  adv.replay_loop = 'auto'

  # DDPM-IP baseline: x_t built from eps + gamma * xi while the target stays eps.
  config.input_perturbation = ip = ml_collections.ConfigDict()
  ip.gamma = 0.0

  # Consistency models (objective cd | ct; objectives/cm.py has the formulas).
  config.consistency = cm = ml_collections.ConfigDict()
  cm.scalings = 'lcm'            # lcm: c_skip / c_out of u = timestep_scaling * t; cm: of sigma~
  cm.sigma_data = 0.5
  cm.timestep_scaling = 10.0     # lcm only
  cm.t_min = 0                   # the boundary timestep: f(x, t_min) = x
  cm.sigma_max = 80.0            # the largest sigma~ = sqrt((1 - abar) / abar) trained and sampled
  cm.pairs = 'grid'              # grid (CD, CT) | improved_ct (N(k) curriculum) | ect
  cm.num_points = 18             # grid: N points from t_min to sigma_max
  cm.grid = 'karras'             # grid: karras (on sigma~, rho) | uniform (in t)
  cm.rho = 7.0
  cm.skip = 1                    # grid: pairs t_{n+k} -> t_n, one teacher step apart
  cm.n_start = 10                # improved_ct: s0 and s1 of N(k) = min(s0 2^(k / K'), s1) + 1
  cm.n_max = 1280
  cm.p_mean = -1.1               # improved_ct, ect: lognormal pair sampling on sigma~
  cm.p_std = 2.0
  cm.ect_stage_updates = 10_000  # ect: optimizer updates per stage (each halves the gap)
  cm.target_ema = 0.0            # mu of the target network; 0: the student, stop-gradient
  cm.distance = 'l2'             # l2 (mean square) | pseudo_huber (on the per-sample norm)
  cm.weighting = 'uniform'       # uniform | inverse_gap: 1 / (sigma~_t - sigma~_s)
  cm.teacher_solver = 'heun'     # cd: ddim (1 teacher call) | heun (2)
  cm.target_at = 'clean'         # AT: target at the clean input | perturbed

  # Sampling (--mode=sample) and the evaluation sweep (--mode=eval) of a trained run.
  config.eval = ev = ml_collections.ConfigDict()
  ev.step = -1                   # checkpoint step to load; -1 = the latest
  ev.use_ema = True              # EMA params (else the raw training params)
  ev.ema_index = 0               # which of training.ema_rates
  ev.seed = 0                    # batch b uses fold_in(key(seed), b): any device count
  ev.batch_size = 256            # global images per sampler call; a multiple of the devices
  ev.num_samples = 50_000        # per sample run, and per cell of the sweep
  # --mode=sample: one setting, written as .npz shards.
  ev.sampler = 'dpm_solver++'    # ancestral | ddim | dpm_solver++ | consistency
  ev.nfe = 10                    # network evaluations (= sampler steps for all three)
  ev.eps_scale = 1.0             # epsilon scaling lambda (ADM-ES): eps / lambda; 1 = off
  ev.out_dir = ''                # empty: RUN/samples/<sampler>_nfe<N>_es<lambda>
  # --mode=eval: every combination of these, results in RUN/eval/.
  ev.samplers = ('ancestral', 'ddim', 'dpm_solver++')
  ev.nfes = (50, 20, 10, 8, 5)
  ev.eps_scales = (1.0,)
  # Converted FID Inception weights (python -m atdiff_jax.tools.convert_inception);
  # empty: no FID / IS, only the offline metrics (fd_digits, fd_pixels).
  ev.inception_weights = ''
  # FID reference statistics (.npz with mu, sigma); empty: computed once from config.data
  # and cached next to the weights file as <weights name>_<dataset>_stats.npz.
  ev.ref_stats = ''
  # Keyword options of each sampler function (atdiff_jax.samplers); 'dpm_solver_pp' is
  # for 'dpm_solver++' (t_end is 1/T). It starts at t=0.992, as the AT paper: at t=1 the
  # cosine schedule's alpha is ~0 and the unclipped x0 prediction explodes.
  ev.sampler_options = ml_collections.ConfigDict()
  ev.sampler_options.ancestral = ml_collections.ConfigDict({'clip_x0': True})
  ev.sampler_options.ddim = ml_collections.ConfigDict({'clip_x0': True, 'eta': 0.0})
  ev.sampler_options.dpm_solver_pp = ml_collections.ConfigDict(
      {'order': 2, 'skip_type': 'logSNR', 't_start': 0.992, 'clip_x0': False,
       'lower_order_final': True})
  # Consistency sampling: f at sigma~_max, then re-noise to each next time (timesteps: the
  # original-scale times to call the model at; empty: a Karras grid from the run's
  # consistency.sigma_max).
  ev.sampler_options.consistency = ml_collections.ConfigDict({'clip_x0': True,
                                                              'timesteps': ()})

  # --mode=probe: the mismatch and robustness probes of the eval.sampler setting, in RUN/probe/.
  config.probe = probe = ml_collections.ConfigDict()
  probe.run = ('mismatch', 'robustness')
  probe.num_samples = 512        # samples (and real images) per measurement
  probe.norm = 'l2'              # l2 | linf: the attack's ball
  probe.radii = (0.1,)           # per pixel, as adv.radius with radius_scale per_dim
  probe.attack_steps = 3         # PGD steps, step size 2.5 * radius / steps
  probe.attack_at = ('all', -1)  # sampler steps whose x_t is attacked: 'all' or an index
  probe.num_timesteps = 10       # evenly spaced t of the denoising-error curve
  return config
