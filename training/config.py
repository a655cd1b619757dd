"""Training configuration: one pydantic-settings model, YAML file < env (AMA_*) < command line.

Every component of the method is a switch here so the paper's ablations (Table 1 bottom,
Table 3) are configs, not code: the mirrored pair, spectral norm, gradient penalty, simplex
interpolation, atypical negatives (mode, direction, radius) and the latent regulariser.
Defaults are the paper's hyperparameters (docs/training.md says where the code departs from them).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ama_stream.model import ModelConfig
from ama_stream.settings import AmaSettings, Section

from .datasets import DataConfig


class ModelSection(Section):
    nz: int = Field(128, ge=1)  # size of the latent code E(x)
    enc_width: int = Field(64, ge=1)  # encoder channels at the first down-sampling step (doubling at each)
    gen_width: int = Field(256, ge=1)  # generator channels in every residual block
    disc_width: int = Field(128, ge=1)  # critic channels; also the size of the features f the R-score compares
    spectral_norm: bool = True  # spectral norm on every critic layer (off: an unbounded critic, R ~1e10; float16 scoring refused)
    mirrored: bool = True  # False = the "w/o mirrored" ablation: D sees single images
    gen_shortcut: Literal["conv", "identity"] = "conv"  # G up-block shortcut: learned 1x1 (authors) or identity
    init: Literal["xavier", "default"] = "xavier"  # the authors' SNGAN xavier init of G and D, or PyTorch's


class GradientPenaltySection(Section):
    enabled: bool = True  # WGAN-GP penalty on interpolates between (x, x) and (x, G(E(x)))
    weight: float = Field(10.0, ge=0)  # lambda of the penalty
    # interpolates per step the penalty is estimated on (a random subset of the batch; None = all):
    # the double backward is the costly part on CPUs, and a subset is still an unbiased estimate;
    # distributed training splits them over the processes
    samples: int | None = Field(None, ge=1)
    # lazy regularisation (as StyleGAN2 does for R1): the penalty on every k-th critic step only, its
    # weight multiplied by k, so the same pull at 1/k of the double-backward cost
    every: int = Field(1, ge=1)
    # one-sided (Petzka et al. 2018, WGAN-LP): penalise only gradient norms above 1, the Lipschitz bound
    # itself, instead of pulling every norm to exactly 1
    one_sided: bool = False


class InterpolationSection(Section):
    enabled: bool = True  # simplex interpolation of k codes, scored against the first source image
    k: int = Field(3, ge=2)  # codes mixed per interpolant
    alpha_max: float = Field(0.5, gt=0)  # alpha_i ~ U(0, alpha_max), weights alpha_i / sum(alpha)
    weight: float = Field(0.5, ge=0)  # lambda_inter
    # own: the interpolant is paired with its first source x, (x, G(sum w_i e_i)) as the paper describes it;
    # all: with each of its k sources, averaged (the authors' code; k times the critic work)
    pair_with: Literal["own", "all"] = "own"


class NegativesSection(Section):
    """Atypical selection: latent codes outside the data's typical region, decoded as negatives."""

    enabled: bool = True  # atypical latent codes decoded as negatives E/G must not reconstruct
    # shell: the paper's spherical shell; relative: scaled E(x) (the authors' code); cube: Sipple 2020;
    # synthetic: pixel-space negatives, good training images with a synthetic defect implanted (kinds below)
    mode: Literal["shell", "relative", "cube", "synthetic"] = "shell"
    direction: Literal["inward", "outward"] = "inward"  # shell/relative: inside or outside the normal codes' radius
    radius: Literal["typical", "empirical"] | float = "typical"  # typical: sqrt(nz); empirical: batch median ||E(x)||
    # shell radius law: uniform in [r_in, r_out] (the paper), or uniform over the shell's volume
    radial: Literal["uniform", "volume"] = "uniform"
    delta: float = Field(0.5, gt=0)  # shell thickness as a fraction of the radius (cube: box margin)
    weight: float = Field(5.0, ge=0)  # lambda_neg
    start_epoch: int = Field(10, ge=0)  # 0-based: the paper starts at epoch 11
    fraction: float = Field(0.1, gt=0, le=1)  # negatives per batch, as a fraction of the batch size (distributed: of each process's share)
    # synthetic: which defects (ama_stream.defects: spot, scratch, cutpaste, blend), their extent in
    # pixels of the model input (log-uniform in the range) and contrast (uniform; 1 = the full range)
    kinds: list[Literal["spot", "scratch", "cutpaste", "blend"]] = ["spot", "scratch", "cutpaste", "blend"]
    size: tuple[float, float] = (2.0, 16.0)  # synthetic: [min, max] extent of a defect in model-input pixels
    contrast: tuple[float, float] = (0.1, 0.6)  # synthetic: [min, max] share of the intensity range it moves

    @model_validator(mode="after")
    def _synthetic_ranges(self):
        if not self.kinds:
            raise ValueError("kinds must name at least one defect kind")
        if not 1 <= self.size[0] <= self.size[1]:
            raise ValueError(f"size must be [min, max] with 1 <= min <= max, got {list(self.size)}")
        if not 0 < self.contrast[0] <= self.contrast[1] <= 1:
            raise ValueError(f"contrast must be [min, max] with 0 < min <= max <= 1, got {list(self.contrast)}")
        return self

    @field_validator("radius")
    @classmethod
    def _positive_radius(cls, v):
        if isinstance(v, float) and v <= 0:
            raise ValueError("radius must be 'typical', 'empirical' or a positive number")
        return v


class LossSection(Section):
    gradient_penalty: GradientPenaltySection = GradientPenaltySection()
    interpolation: InterpolationSection = InterpolationSection()
    negatives: NegativesSection = NegativesSection()
    latent_reg: float = Field(1.0, ge=0)  # lambda_reg * mean ||E(x)||_2; 0 disables
    # BatchNorm in the auxiliary E/G passes (negatives, interpolants): "running" = eval-mode statistics,
    # left unchanged, so only normal reconstructions set what scoring uses; "own" = each pass's own
    # batch statistics, running averages left unchanged too; "batch" = their own batch statistics,
    # which also move the running averages (the old behaviour)
    aux_bn: Literal["running", "own", "batch"] = "running"


class OptimSection(Section):
    lr: float = Field(3e-4, gt=0)  # Adam learning rate of E, G and D
    betas_e: tuple[float, float] = (0.5, 0.9)  # Adam betas of the encoder
    betas_g: tuple[float, float] = (0.0, 0.9)  # Adam betas of the generator
    betas_d: tuple[float, float] = (0.0, 0.9)  # Adam betas of the critic
    milestones: list[int] = [30, 60, 90]  # epochs at which every lr is multiplied by gamma
    gamma: float = Field(0.1, gt=0)  # lr factor at each milestone
    d_steps: int = Field(5, ge=1)  # critic updates per E/G update


class TrainSection(Section):
    epochs: int = Field(100, ge=1)  # passes over the training images (or of steps_per_epoch steps)
    batch_size: int = Field(256, ge=2)  # normal images per step (distributed: the global batch, split evenly over the processes)
    steps_per_epoch: int | None = Field(None, ge=1)  # cap an epoch (CPU presets); None = one pass
    max_steps: int | None = Field(None, ge=1)  # stop after this many E/G steps in all
    log_every: int = Field(50, ge=1)  # a loss line (and a metrics.csv row) every N steps
    channels_last: bool = True  # NHWC activations: about 2x faster convolutions on CPU (mkldnn)
    fit_max_images: int = Field(20000, ge=2)  # training images used to fit mu/sigma of R
    select_from_epoch: int = Field(20, ge=0)  # model selection with labelled val anomalies starts here
    # exponential moving average of the E, G and D weights, used for the saved model (None = the last
    # weights). GAN training oscillates; an average over the last ~1/(1-decay) steps is steadier
    ema_decay: float | None = Field(None, gt=0, lt=1)
    # after training: implant synthetic defects (2-32 px, two contrasts) into held-out good images and
    # report which the model catches at its default threshold (ama_stream.sensitivity), about a minute
    sensitivity: bool = True
    # the training guard: a step whose loss is not finite, or whose critic values (the Wasserstein
    # estimate, the critic's losses) pass this magnitude, stops training; the model of the last good
    # step is saved. Adam's float32 second moment overflows near |grad| ~ 1e19 and then silently stops
    # learning: a critic past 1e12 is on its way there. None: only non-finite values stop it
    max_critic: float | None = Field(1e12, gt=0)


class TrainConfig(AmaSettings):
    data: DataConfig
    model: ModelSection = ModelSection()
    loss: LossSection = LossSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    # the calibration policy `ama-stream calibrate` uses for this model unless told otherwise: upper
    # where unusually LOW R-scores are not a sign of anomaly for this data (docs/results.md measures it)
    policy: Literal["two-sided", "upper"] = "two-sided"
    # the model's score: r, the paper's R-score (L1 norm of the critic feature difference), or
    # mahalanobis, that difference's Mahalanobis distance under a Gaussian fitted on good training
    # images (ama_stream.feature_gaussian; whole-image models only). docs/results.md measures both
    score: Literal["r", "mahalanobis"] = "r"
    seed: int = 0  # seeds weights, data order, negatives and the test sampling
    device: str = "auto"  # auto (first CUDA device, else CPU), cpu or cuda:N
    data_root: str | None = None  # AMA_DATA_ROOT; relative data roots resolve against it

    @model_validator(mode="after")
    def _check_model_fits_data(self):
        if not self.data.shape_is_auto:  # "auto" is checked once resolved from the data
            self.model_config_for_data()  # raises ValueError with a clear message if not
        if self.score == "mahalanobis" and self.data.patch is not None:
            raise ValueError("score: mahalanobis is for whole-image models; a patch model (data.patch) scores with r")
        return self

    def model_config_for_data(self) -> ModelConfig:
        return ModelConfig(
            image_size=self.data.image_size,
            channels=self.data.channels,
            nz=self.model.nz,
            enc_width=self.model.enc_width,
            gen_width=self.model.gen_width,
            disc_width=self.model.disc_width,
            spectral_norm=self.model.spectral_norm,
            mirrored=self.model.mirrored,
            gen_shortcut=self.model.gen_shortcut,
            init=self.model.init,
        )
