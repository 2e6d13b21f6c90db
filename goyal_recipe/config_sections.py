"""The sections of the recipe config: one typed class per section, the docstring under each field its meaning.

`config.py` assembles them into `RecipeConfig` and reads recipes; units are in the names (see there).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError


def _non_finite(value, key: str = "") -> str | None:
    """The dotted key of the first non-finite float in `value` (a setting, or a list or mapping of them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return key
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for sub, item in items:
        found = _non_finite(item, f"{key}.{sub}" if key else str(sub))
        if found is not None:
            return found
    return None


class _Section(BaseModel):
    # allow_inf_nan=False: every float setting is finite (an LR of inf trains NaN weights without an error);
    # the check below covers untyped values (model.kwargs) too.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)

    @model_validator(mode="after")
    def _every_number_finite(self):
        for name in type(self).model_fields:
            value = getattr(self, name)
            key = None if isinstance(value, BaseModel) else _non_finite(value, name)
            if key is not None:
                raise PydanticCustomError("finite_number", "Input should be a finite number", {"key": key})
        return self


class RunConfig(_Section):
    name: str = "run"
    """Run directory is `<output_dir>/<name>`."""
    output_dir: str = "runs"
    """Directory holding the run directories."""
    seed: int = 0
    """Seeds the data order, augmentation and model init."""
    resume: str = "none"
    """"none", "auto" (newest complete checkpoint of this run, if any) or a checkpoint directory."""
    log_every_updates: int = Field(10, ge=1)
    """A progress line and a step record in metrics.jsonl every this many updates."""
    checkpoint_every_updates: int = Field(0, ge=0)
    """Checkpoint inside epochs every this many updates; 0: only at the end of each epoch."""
    keep_checkpoints: int = Field(2, ge=1)
    """Complete checkpoints kept (the newest); older ones are deleted."""
    eval_every_epochs: int = Field(1, ge=0)
    """Evaluate on the validation set every this many epochs (and after the last); 0: no evaluation."""
    max_updates: int | None = Field(None, ge=1)
    """Stop (with a checkpoint) after this many updates in total; for smoke tests and time limits."""
    trackers: list[Literal["tensorboard"]] = []
    """Experiment trackers that also receive the metrics (tensorboard needs the tracking extra)."""
    plots: bool = True
    """Draw plots/*.png (error, loss, LR curves) at the end of the run."""
    max_consecutive_nonfinite: int = Field(3, ge=0)
    """Updates with a non-finite loss or gradient are skipped (all ranks agree); more in a row stops the run."""
    keep_freed_cpu_memory: bool = True
    """On a CPU device, keep freed memory in the process for the next update instead of returning it
    to the kernel (glibc's mallopt; about 9 % faster updates); the process keeps its peak heap size."""
    collective_timeout_s: int = Field(1800, ge=1)
    """A rank waiting longer than this in a collective (e.g. for a dead peer) fails instead of hanging."""
    noise_scale: bool = True
    """Measure the gradient noise scale B_simple (McCandlish et al. 2018) from each update's own gradients:
    logged as noise_scale, noise_grad_sq, noise_trace_sigma; needs world size x accumulation steps >= 2."""
    noise_scale_every_updates: int = Field(4, ge=1)
    """Measure the noise scale on every N-th update: its two passes over the gradients cost about 2 % of a
    CPU update of a small-image model when taken every update (N = 1), far less on a GPU."""
    noise_scale_ema_decay: float = Field(0.95, ge=0, lt=1)
    """Decay of the moving averages of |G|^2 and tr(Sigma) over measurements (0.95: about the last 20)."""


class GenerateConfig(_Section):
    """A generated dataset written to `data.root` when it is not there yet (`goyal-data generate`)."""

    num_classes: int = Field(10, ge=2)
    """Classes of the generated dataset."""
    train_per_class: int = Field(100, ge=1)
    """Training images per class."""
    val_per_class: int = Field(20, ge=1)
    """Validation images per class."""
    image_width: int = Field(64, ge=8)
    """Width of the generated JPEGs."""
    image_height: int = Field(48, ge=8)
    """Height of the generated JPEGs."""
    difficulty: float = Field(0.5, ge=0, le=1)
    """0: classes trivially separable; 1: hardest to tell apart."""
    seed: int = 0
    """Seeds the generated images."""


class DataConfig(_Section):
    source: Literal["imagefolder", "parquet", "hf"] = "imagefolder"
    """Where the images come from: JPEG class folders, parquet shards with image bytes, or a Hugging Face dataset."""
    root: str = "data/imagenet"
    """ImageNet layout: `<root>/train/<synset>/*.JPEG` and `<root>/val/<synset>/*.JPEG`; parquet: `<root>/parquet`."""
    hf_name: str | None = None
    """For source=hf: a dataset name in the local Hugging Face cache (e.g. imagenet-1k)."""
    allow_download: bool = False
    """For source=hf: let the datasets library download what the local cache lacks."""
    generate: GenerateConfig | None = None
    """Generate a dataset at data.root when it is not there yet (quickstart, tests); None: use data.root as it is."""
    image_size: int = Field(224, ge=8)
    """Training crop; evaluation resizes to image_size * 256/224 and centre-crops image_size."""
    crop_min_area: float = Field(0.08, gt=0, le=1)
    """Smallest fraction of the image area a random-resized crop covers."""
    color_jitter: float = Field(0.0, ge=0)
    """Strength of brightness, contrast and saturation jitter; 0: off."""
    pca_lighting: float = Field(0.0, ge=0)
    """Standard deviation of AlexNet-style PCA lighting noise; 0: off."""
    workers: int = Field(8, ge=0)
    """Loader worker processes per device."""
    eval_batch_size: int | None = Field(None, ge=1)
    """Per device; default: per_device_batch_size."""
    bad_images: Literal["fail", "skip"] = "fail"
    """An image that cannot be decoded: "fail" stops the run naming the file; "skip" trains on the next
    decodable sample in its place (deterministic, counted; evaluation leaves it out). `goyal-data
    validate ROOT` lists every bad file beforehand."""
    decode_draft: bool = True
    """Decode a JPEG at 1/2, 1/4 or 1/8 size (libjpeg DCT scaling via PIL's draft) when the crop allows it:
    the largest reduction at which the crop box, counted in reduced pixels, still has at least image_size
    pixels in both dimensions (evaluation: the shorter side at least image_size * 256/224). The resize after
    it then never upsamples where the full decode did not; the crop box (drawn from the header size with the
    same RNG draws) is unchanged and the pixels differ by resampling noise only. false: always full size."""
    decode: Literal["cpu", "gpu"] = "cpu"
    """Where JPEGs are decoded. cpu: in the loader workers (libjpeg-turbo via torchvision or, drafted and for
    other formats, PIL), which hand uint8 crops to the main process; each batch is converted to float, lit
    (data.pca_lighting, with the workers' draws) and normalised on the training device. gpu: workers read
    the bytes and draw the crop; the main process decodes each batch on the training device with nvjpeg
    (torchvision.io.decode_jpeg) and crops, resizes, flips and normalises there, taking the cpu path (same
    crop) for files it cannot decode (CMYK, PNG, corrupt). Without CUDA the stage runs on the CPU after a
    one-line warning: the same images (so a GPU recipe can be tried on a CPU machine), but slower than cpu,
    as one process decodes what the workers would."""


class ModelConfig(_Section):
    name: str = "resnet50"
    """Any timm model name."""
    kwargs: dict[str, Any] = {}
    """Extra keyword arguments of `timm.create_model`, e.g. {channels: [16, 32, 64, 128]} for a narrow ResNet."""
    num_classes: int | None = Field(None, ge=2)
    """Default: the number of classes of the data."""
    zero_init_last: bool = True
    """gamma = 0 in the last BN of each residual block (Sec. 5.1); false for the gamma = 1 ablation."""
    fc_init_std: float | None = 0.01
    """Classifier weights ~ N(0, std^2), bias 0, as in the paper; None keeps timm's init."""
    bn: Literal["ghost", "per_device", "sync"] = "ghost"
    """ghost: statistics over bn_group_size samples; per_device: over the micro-batch; sync: over all devices."""
    bn_group_size: int = Field(32, ge=1)
    """n of the paper: images per BN statistics group (ghost mode)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocast for the forward pass; BN statistics and optimizer state stay fp32."""
    channels_last: bool = False
    """Channels-last memory format (faster convolutions on GPUs with tensor cores)."""
    compile: bool = False
    """torch.compile the model (falls back to eager where the backend is missing)."""


class BatchConfig(_Section):
    global_batch_size: int = Field(256, ge=1)
    """kn: images per optimizer update over all devices and accumulation micro-batches."""
    per_device_batch_size: int = Field(32, ge=1)
    """Images per device per forward pass (one accumulation micro-batch)."""


class OptimConfig(_Section):
    optimizer: Literal["sgd", "folded_sgd", "lars", "lamb"] = "sgd"
    """sgd: torch.optim.SGD (eq. 9); folded_sgd: LR inside the velocity (eq. 10) with momentum correction;
    lars, lamb: timm's Lars and Lamb (You et al. 2017, 2019), BN and biases excluded from decay and trust ratio."""
    trust_coefficient: float = Field(0.001, gt=0)
    """lars: the trust coefficient eta of the layer-wise LR eta |w| / (|g| + lambda |w|) (You et al. 2017)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """Momentum m of eq. (9)."""
    nesterov: bool = True
    """Nesterov momentum."""
    momentum_correction: bool = True
    """folded_sgd: scale the velocity by lr_new / lr_old when the LR changes (eq. 10)."""
    weight_decay: float = Field(1e-4, ge=0)
    """L2 weight decay lambda of the weights (eq. 8)."""
    norm_weight_decay: float = Field(0.0, ge=0)
    """Weight decay of BN scales and shifts."""
    bias_weight_decay: float | None = Field(None, ge=0)
    """Weight decay of biases; None: the same as weight_decay."""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """Label smoothing of the cross-entropy; 0 in the paper."""
    base_lr: float = Field(0.1, gt=0)
    """LR of the reference minibatch base_batch_size."""
    base_batch_size: int = Field(256, ge=1)
    """The reference minibatch of base_lr; LR = base_lr x global_batch_size / base_batch_size (linear scaling)."""
    scaling: Literal["linear", "sqrt", "none"] = "linear"
    """How the LR grows with global_batch_size: linear (the paper's rule), sqrt, or none."""
    warmup: Literal["gradual", "constant", "none"] = "gradual"
    """gradual: LR ramps linearly to its peak over warmup_epochs (Sec. 2.2); constant: base LR, then the jump."""
    warmup_epochs: float = Field(5.0, ge=0)
    """Length of the warmup."""
    warmup_start_lr: float | None = Field(None, ge=0)
    """LR at the start of the warmup; None: base_lr, the LR of the reference minibatch."""
    decay: Literal["step", "cosine", "poly", "none"] = "step"
    """After the warmup: step (x gamma at each milestone), cosine, poly (polynomial to 0), or none."""
    poly_power: float = Field(2.0, gt=0)
    """Power of the poly decay (2 in You et al.'s LARS ResNet-50 runs)."""
    milestones: list[float] = [30, 60, 80]
    """Epochs at which step decay multiplies the LR by gamma."""
    gamma: float = Field(0.1, gt=0)
    """Step decay factor."""
    epochs: int = Field(90, ge=1)
    """Length of training."""
    grad_clip_norm: float | None = Field(None, gt=0)
    """Clip the global gradient norm before each update; None (the paper): no clipping."""


class DebugConfig(_Section):
    """Switches for finding faults in the loop (and for its tests); a run for results leaves them off."""

    log_samples: bool = False
    """Write the sample indices of every update per rank to samples_rank<r>.jsonl (check data coverage)."""
    inject_nonfinite_updates: list[int] = []
    """Fault injection: the loss of these updates (1-based loop iterations) is made NaN on the last rank."""


class DeepSpeedConfig(_Section):
    """Settings of engine=deepspeed. The batch chain, optimizer, LR and precision come from the recipe."""

    zero_stage: Literal[0, 1] = 0
    """0: plain data parallel; 1: optimizer state sharded. ResNet-50's 25M parameters and SGD's one
    momentum buffer (100 MB in fp32) fit every GPU, so sharding only adds communication."""
    config_file: str | None = None
    """A ds_config JSON whose fields are added to the generated one; batch fields must agree with the recipe."""
