"""Diffusion samplers in plain numpy (no torch, no diffusers).

The runtime runs on a Jetson where neither torch nor diffusers is installed, so
the three schedulers the exported models need are re-implemented here.
Each one reproduces the corresponding ``diffusers`` class step for step:

* ``DDIMScheduler``               <-> ``diffusers.DDIMScheduler`` (eta = 0)
* ``DPMSolverMultistepScheduler`` <-> ``diffusers.DPMSolverMultistepScheduler``
  (dpmsolver++, 2nd order, midpoint, final sigma 0)
* ``FlowMatchEulerScheduler``     <-> ``diffusers.FlowMatchEulerDiscreteScheduler``
  (static ``shift``)

Arithmetic deliberately follows diffusers: the noise tables are float32 and
every update is evaluated in float32 in the same order as the torch code, so
the results agree with diffusers to float32 rounding rather than merely to the
same maths.  (Not bitwise: torch.linspace and torch's float32 sqrt/exp/log can
round differently from numpy by an ulp.)  Config keys that would select a code path not implemented here
are rejected by ``from_config`` instead of being silently ignored.
"""

import inspect
import math

import numpy as np

__all__ = [
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "FlowMatchEulerScheduler",
    "SCHEDULERS",
    "make_scheduler",
]


def _alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule):
    """The float32 ``alphas_cumprod`` table of a DDPM-style noise schedule."""
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps).astype(np.float32)
    elif beta_schedule == "scaled_linear":
        # Linear in sqrt(beta), as used by Stable Diffusion and PixArt.
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps).astype(np.float32) ** 2
    else:
        raise ValueError(f"beta_schedule {beta_schedule!r} is not supported; use 'linear' or 'scaled_linear'")
    alphas = np.float32(1.0) - betas
    # torch.cumprod on CPU accumulates float32 input in float64 and rounds each
    # partial product to float32; doing the same keeps the table identical.
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _f32(x):
    return np.asarray(x, dtype=np.float32)


class _Scheduler:
    """Shared plumbing: config handling and the diffusers-style surface."""

    name = ""
    # Diffusers config keys whose other values select behaviour we do not
    # implement; from_config accepts them only at these values.
    _fixed = {}

    init_noise_sigma = 1.0

    @classmethod
    def from_config(cls, cfg):
        params = inspect.signature(cls.__init__).parameters
        for key, supported in cls._fixed.items():
            if key in cfg and cfg[key] != supported:
                raise ValueError(
                    f"{cls.__name__} only supports {key}={supported!r}, got {cfg[key]!r}"
                )
        # Unknown keys (diffusers bookkeeping such as "_class_name", options
        # that have no effect here, our own "name") are ignored.
        return cls(**{k: v for k, v in cfg.items() if k in params and k != "self"})

    def _record_config(self, local_vars):
        params = inspect.signature(type(self).__init__).parameters
        self.config = {"name": self.name}
        self.config.update({k: local_vars[k] for k in params if k != "self"})

    def scale_model_input(self, sample, timestep=None):
        # None of these schedulers rescale the model input (kept for parity
        # with the diffusers API so pipeline code can call it unconditionally).
        return sample

    def _check_steps(self, num_inference_steps):
        n = int(num_inference_steps)
        if not 1 <= n <= self.config["num_train_timesteps"]:
            raise ValueError(
                f"num_inference_steps must be between 1 and {self.config['num_train_timesteps']}, got {n}"
            )
        return n

    def _index_for_timestep(self, timestep):
        # Same rule as diffusers: the first step() call locates the starting
        # index (so img2img can start part-way); if a timestep occurs twice the
        # second occurrence is taken, and an unknown one maps to the last step.
        hits = np.flatnonzero(self.timesteps == timestep)
        if len(hits) == 0:
            return len(self.timesteps) - 1
        return int(hits[1] if len(hits) > 1 else hits[0])


class DDIMScheduler(_Scheduler):
    """Deterministic DDIM (eta = 0), matching ``diffusers.DDIMScheduler``."""

    name = "ddim"
    _fixed = {"trained_betas": None, "thresholding": False, "rescale_betas_zero_snr": False}

    def __init__(
        self,
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
        timestep_spacing="leading",
    ):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {prediction_type!r} is not supported; use 'epsilon' or 'v_prediction'")
        if timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"timestep_spacing {timestep_spacing!r} is not supported")
        self._record_config(locals())
        self.alphas_cumprod = _alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule)
        # Alpha used for the step that lands past t = 0.
        self.final_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.num_inference_steps = None
        self.timesteps = np.arange(num_train_timesteps, dtype=np.int64)[::-1].copy()

    def set_timesteps(self, num_inference_steps):
        n = self._check_steps(num_inference_steps)
        N = self.config["num_train_timesteps"]
        spacing = self.config["timestep_spacing"]
        self.num_inference_steps = n
        if spacing == "linspace":
            t = np.linspace(0, N - 1, n).round()[::-1].astype(np.int64)
        elif spacing == "leading":
            t = (np.arange(0, n) * (N // n)).round()[::-1].astype(np.int64)
            t += self.config["steps_offset"]
        else:  # trailing
            t = np.round(np.arange(N, 0, -N / n)).astype(np.int64) - 1
        self.timesteps = t.copy()

    def step(self, model_output, timestep, sample):
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps() before step()")
        cfg = self.config
        model_output, sample = _f32(model_output), _f32(sample)
        t = int(timestep)
        # diffusers always steps back by N // n, whatever the spacing; for
        # 'linspace'/'trailing' that is not the next entry of `timesteps`, but
        # reproducing it is the point.
        prev_t = t - cfg["num_train_timesteps"] // self.num_inference_steps

        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t = np.float32(1.0) - a_t

        if cfg["prediction_type"] == "epsilon":
            x0 = (sample - np.sqrt(b_t) * model_output) / np.sqrt(a_t)
            eps = model_output
        else:  # v_prediction: v = sqrt(a) * eps - sqrt(1 - a) * x0
            x0 = np.sqrt(a_t) * sample - np.sqrt(b_t) * model_output
            eps = np.sqrt(a_t) * model_output + np.sqrt(b_t) * sample

        if cfg["clip_sample"]:
            r = cfg["clip_sample_range"]
            x0 = np.clip(x0, -r, r).astype(np.float32)

        # eta = 0: no noise term, so the direction is sqrt(1 - a_prev) * eps.
        direction = np.sqrt(np.float32(1.0) - a_prev) * eps
        return (np.sqrt(a_prev) * x0 + direction).astype(np.float32)


class DPMSolverMultistepScheduler(_Scheduler):
    """DPM-Solver++(2M), matching ``diffusers.DPMSolverMultistepScheduler``.

    Only the default solver (dpmsolver++, solver_order 2, midpoint, final sigma
    0, no Karras/exponential/beta/Lu sigmas) is implemented.  With a final sigma
    of 0 diffusers always makes the last step first order, so
    ``lower_order_final`` has no effect for order 2 and is not needed here.

    Stateful: the previous step's data prediction is kept for the second-order
    update; ``set_timesteps`` resets it.
    """

    name = "dpm++2m"
    _fixed = {
        "trained_betas": None,
        "solver_order": 2,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "thresholding": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf,
        "variance_type": None,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
    }

    def __init__(
        self,
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        timestep_spacing="linspace",
        steps_offset=0,
    ):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {prediction_type!r} is not supported; use 'epsilon' or 'v_prediction'")
        if timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"timestep_spacing {timestep_spacing!r} is not supported")
        self._record_config(locals())
        ac = _alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule)
        # Noise-to-signal ratio per training timestep (the "sigma" of the
        # equivalent variance-exploding process), float32 as in diffusers.
        self.train_sigmas = np.sqrt((np.float32(1.0) - ac) / ac)
        self.num_inference_steps = None
        self.timesteps = np.arange(num_train_timesteps, dtype=np.int64)[::-1].copy()
        self._reset()

    def _reset(self):
        self._prev_x0 = None  # data prediction of the previous step
        self._step_index = None

    def set_timesteps(self, num_inference_steps):
        n = self._check_steps(num_inference_steps)
        N = self.config["num_train_timesteps"]
        spacing = self.config["timestep_spacing"]
        # Unlike DDIM, the grid has n + 1 points and the final t = 0 is dropped:
        # the last step goes to sigma = 0 instead.
        if spacing == "linspace":
            t = np.linspace(0, N - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif spacing == "leading":
            t = (np.arange(0, n + 1) * (N // (n + 1))).round()[::-1][:-1].astype(np.int64)
            t += self.config["steps_offset"]
        else:  # trailing
            t = np.arange(N, 0, -N / n).round().astype(np.int64) - 1
        self.timesteps = t.copy()
        sigmas = np.interp(self.timesteps, np.arange(N), self.train_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.num_inference_steps = len(self.timesteps)
        self._reset()

    @staticmethod
    def _alpha_sigma(sigma):
        # VE sigma -> (alpha_t, sigma_t) of the VP process: alpha^2 + sigma^2 = 1.
        alpha = np.float32(1.0) / np.sqrt(sigma * sigma + np.float32(1.0))
        return alpha, sigma * alpha

    @classmethod
    def _lambda(cls, sigma):
        # Half log-SNR, the time variable DPM-Solver integrates in.
        alpha, sigma_t = cls._alpha_sigma(sigma)
        return np.log(alpha) - np.log(sigma_t)

    def step(self, model_output, timestep, sample):
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps() before step()")
        model_output, sample = _f32(model_output), _f32(sample)
        if self._step_index is None:
            self._step_index = self._index_for_timestep(timestep)
        i = self._step_index

        # Convert the network output into a prediction of x0 ("data
        # prediction"), which is what dpmsolver++ extrapolates.
        alpha_s, sigma_s = self._alpha_sigma(self.sigmas[i])
        if self.config["prediction_type"] == "epsilon":
            x0 = (sample - sigma_s * model_output) / alpha_s
        else:  # v_prediction
            x0 = alpha_s * sample - sigma_s * model_output
        prev_x0, self._prev_x0 = self._prev_x0, x0
        self._step_index += 1

        if self.sigmas[i + 1] == 0:
            # Final step (always first order for final sigma 0): alpha_t = 1,
            # sigma_t = 0, h = inf, so the update reduces exactly to x0.
            # Returning it directly avoids log(0) warnings.
            return x0.astype(np.float32, copy=True)

        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        h = self._lambda(self.sigmas[i + 1]) - self._lambda(self.sigmas[i])
        coef = alpha_t * (np.exp(-h) - np.float32(1.0))
        if prev_x0 is None:
            # First step: no history yet, so first order (DDIM-equivalent).
            x_t = (sigma_t / sigma_s) * sample - coef * x0
        else:
            # Second-order multistep, midpoint variant: a finite difference of
            # the last two x0 predictions in lambda-space corrects the slope.
            h_0 = self._lambda(self.sigmas[i]) - self._lambda(self.sigmas[i - 1])
            r0 = h_0 / h
            d1 = (np.float32(1.0) / r0) * (x0 - prev_x0)
            x_t = (sigma_t / sigma_s) * sample - coef * x0 - np.float32(0.5) * coef * d1
        return x_t.astype(np.float32)


class FlowMatchEulerScheduler(_Scheduler):
    """Euler sampler for rectified-flow models, matching
    ``diffusers.FlowMatchEulerDiscreteScheduler`` with a static ``shift``.

    The model predicts the velocity v = noise - x0; sigma runs from ~1 (noise)
    to 0 (data) and each step is x <- x + (sigma_next - sigma) * v.
    """

    name = "flow-euler"
    _fixed = {
        "use_dynamic_shifting": False,
        "invert_sigmas": False,
        "shift_terminal": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "stochastic_sampling": False,
    }

    def __init__(self, num_train_timesteps=1000, shift=1.0):
        self._record_config(locals())
        N = num_train_timesteps
        # diffusers derives the schedule end points from a shifted training
        # grid (float32) and then shifts the inference grid *again*; the double
        # shift is reproduced on purpose, SD3-style models are tuned to it.
        train_sigmas = np.linspace(1, N, N, dtype=np.float32)[::-1] / np.float32(N)
        train_sigmas = self._shift(train_sigmas)
        self.sigma_max = float(train_sigmas[0])
        self.sigma_min = float(train_sigmas[-1])
        self.num_inference_steps = None
        self.timesteps = (train_sigmas * np.float32(N)).astype(np.float32)
        self._step_index = None

    def _shift(self, sigmas):
        # Moves the schedule towards high noise for shift > 1 (dtype-preserving).
        s = self.config["shift"]
        return s * sigmas / (1 + (s - 1) * sigmas)

    def set_timesteps(self, num_inference_steps):
        n = int(num_inference_steps)
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {n}")
        N = self.config["num_train_timesteps"]
        self.num_inference_steps = n
        # This part runs in float64 in diffusers (numpy), then drops to float32.
        t = np.linspace(self.sigma_max * N, self.sigma_min * N, n)
        sigmas = self._shift(t / N).astype(np.float32)
        self.timesteps = sigmas * np.float32(N)
        self.sigmas = np.concatenate([sigmas, np.zeros(1, dtype=np.float32)])
        self._step_index = None

    def step(self, model_output, timestep, sample):
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps() before step()")
        model_output, sample = _f32(model_output), _f32(sample)
        if self._step_index is None:
            self._step_index = self._index_for_timestep(timestep)
        i = self._step_index
        self._step_index += 1
        dt = self.sigmas[i + 1] - self.sigmas[i]
        return (sample + dt * model_output).astype(np.float32)


SCHEDULERS = {
    "ddim": DDIMScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
    "flow-euler": FlowMatchEulerScheduler,
}


def make_scheduler(config):
    """Build a scheduler from a config dict whose "name" picks the class."""
    name = config.get("name")
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler '{name}'; choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(config)
