"""Typed run configuration: recipes, YAML files and ``a.b=value`` overrides, validated before any work.

Every ablation in DESIGN §1 is a field here. Unknown fields and values are errors that list the
valid ones, so a typo fails in the first second rather than after a cluster spins up.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InputError


# The model vocabulary (``lkd_ray.models.registry`` implements exactly these names and checks so at import):
# kept here so a config is validated without building or importing any model.
MODEL_NAMES = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
               "resnet32x4", "ResNet50", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13", "vgg16",
               "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2", "resnet18", "resnet34", "resnet50", "mobilenet_v2",
               "mobilenet_v1", "cnn_teacher", "cnn_student")


class ConfigError(InputError, ValueError):
    """A configuration problem, worded for the person who wrote the config."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelCfg(_Section):
    teacher: str = "cnn_teacher"
    student: str = "cnn_student"
    teacher_weights: str | None = Field(
        None, description="path, file://, http(s)://, s3:// URI or torchvision[:WEIGHTS]; "
        "None trains a teacher once with this project (cached under run.cache_dir); 'random' (smoke runs only) "
        "an untrained teacher")
    teacher_epochs: int = Field(8, ge=1, description="epochs when the teacher is trained here")
    teacher_batch_size: int | None = Field(None, ge=1, description="batch size when the teacher is trained here (None: "
                                           "data.batch_size), so a student recipe with another batch shares the teacher")
    teacher_cache: bool = Field(False, description="compute the teacher's logits once per augmented view (FKD, Shen & Xing "
                                "2022), store them as Parquet keyed like the teacher, and train on views drawn from them: "
                                "no teacher forward per step. Logits only: with loss.w_feat > 0 the teacher runs live")
    teacher_cache_views: int = Field(0, ge=0, description="views cached per image; 0 = every distinct view of the "
                                     "augmentation (exact: the student sees the live augmentation's distribution)")

    @field_validator("teacher", "student")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in MODEL_NAMES:
            raise ValueError(f"unknown model {v!r}; valid models: {', '.join(MODEL_NAMES)}")
        return v


class DataCfg(_Section):
    dataset: Literal["fashion_mnist", "cifar10", "cifar100", "imagenet", "parquet", "synthetic"] = "fashion_mnist"
    root: str | None = Field(None, description="data root (CIFAR, ImageNet folder; for parquet a path or s3:// URI of shards "
                             "written by jobs/prepare_imagenet.py); Fashion-MNIST looks in the Debian package first")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint for an s3:// parquet root (default AWS_ENDPOINT_URL)")
    quiz_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="share of the training set held out as the meta-learning quiz split")
    split_seed: int = 0
    image_size: int | None = Field(None, description="None: the data set's recipe size (28 Fashion-MNIST, 32 CIFAR, 224 ImageNet)")
    channels: Literal[1, 3] = 1
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    quiz_batch_size: int | None = Field(None, ge=1, description="the meta-step's quiz batch (None: same as batch_size); "
                                        "with meta.unroll_batch_size it sets what a meta-step costs")
    num_workers: int = Field(0, ge=0)
    train_subset: int | None = Field(None, ge=10, description="use only this many training images (after the quiz split); quick runs")
    labels_per_class: int | None = Field(None, ge=1, description="scarce labels: the student trains on a stratified, seeded "
                                         "subset of this many images per class; the teacher still trains on the whole "
                                         "training split (or comes from model.teacher_weights)")
    label_noise: float = Field(0.0, ge=0.0, lt=1.0, description="share of the training labels flipped (seeded, exactly this "
                               "share of every class); the teacher trains on the same noisy labels. The quiz split stays clean")
    noise_kind: Literal["symmetric", "pairflip", "confusion"] = Field(
        "symmetric", description="'symmetric': a flipped label goes to a uniformly drawn other class; 'pairflip': class c "
        "goes to c + 1 (mod C), a fixed confusion map; 'confusion': data.label_noise of every class in "
        "data.confusion_map goes to its mapped class (look-alike classes), other classes stay clean")
    confusion_map: dict[int, int] | None = Field(
        None, description="noise_kind=confusion: source class → the class it is mistaken for; None: the data set's "
        "look-alike classes (Fashion-MNIST: T-shirt/top ↔ shirt, pullover ↔ coat, sandal → sneaker → ankle boot)")
    noise_seed: int | None = Field(None, ge=0, description="which draw of the label noise (None: data.split_seed): "
                                   "another draw, with its own teacher, for error bars that cover the noise")
    noisy_labels: str | None = Field(
        None, description="the user's own labels, one per training image, in the data set's order: a path or s3:// URI "
        "of a .npy, .csv/.txt (one label a line) or a CIFAR-N .pt file (a dict of label arrays: data.noisy_labels_key). "
        "Replaces data.label_noise; the teacher and the student train on them")
    noisy_labels_key: str = Field("worse_label", description="the array of a CIFAR-N style .pt dict to use "
                                  "(CIFAR-10N: aggre_label, worse_label, random_label1..3)")
    trusted: str | None = Field(
        None, description="a small trusted subset: a path or s3:// URI of a .csv (index,label a line) or .npy (N×2) of "
        "training-image indices with their clean labels. It becomes the quiz (and the selection split, when "
        "data.select_per_class is set) and is never trained on")
    select_per_class: int | None = Field(
        None, ge=1, description="a clean selection split of this many images per class, disjoint from the quiz (drawn "
        "from the held-out split, or from data.trusted): what tuning picks on, never what the meta-step trains on")
    quiz_per_class: int | None = Field(None, ge=1, description="a trusted quiz split of this many clean images per class, "
                                       "drawn from the held-out split (never overlapping training); None: the whole held-out "
                                       "split (data.quiz_fraction of the training set)")
    augment: bool = True
    synthetic_size: int = Field(512, ge=32, description="images per split for dataset=synthetic (smoke runs)")
    num_classes_override: int | None = Field(None, ge=2, description="classes for dataset=synthetic")

    @model_validator(mode="after")
    def _labels(self):
        if self.noisy_labels and self.label_noise:
            raise ValueError("data.noisy_labels are the given labels already: leave data.label_noise at 0")
        if self.confusion_map is not None:
            if self.noise_kind != "confusion":
                raise ValueError("data.confusion_map is read only with data.noise_kind=confusion")
            same = sorted(k for k, v in self.confusion_map.items() if k == v)
            if same or any(k < 0 or v < 0 for k, v in self.confusion_map.items()):
                raise ValueError(f"data.confusion_map maps classes to other classes (≥ 0); got {self.confusion_map}")
        if self.trusted and self.quiz_per_class:
            raise ValueError("data.trusted is the quiz: leave data.quiz_per_class unset")
        return self


class OptimCfg(_Section):
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = False
    epochs: int = Field(4, ge=1)
    schedule: Literal["multistep", "cosine", "constant"] = "cosine"
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0, le=1)

    @model_validator(mode="after")
    def _milestones(self):
        if self.schedule == "multistep" and not self.milestones:
            raise ValueError("schedule 'multistep' needs milestones (epochs at which lr is multiplied by gamma)")
        return self


METHOD_NAMES = ("ce", "kd", "dkd", "dist", "wsl", "lkd", "control")
CE_RULE_NAMES = ("plain", "agree", "agree_soft", "relabel", "gce", "sce", "boot_soft", "boot_hard", "small_loss")
TEACHER_CE_RULES = ("agree", "agree_soft", "relabel")


class LossCfg(_Section):
    method: Literal["ce", "kd", "dkd", "dist", "wsl", "lkd", "control"] = Field(
        "lkd", description="'control': KD with one meta-learned weight on the KD term (w = exp(s), s₀ = 0), learned by "
        "the same meta-step as LKD; if LKD only matches it, the network learned a step size, not a loss. 'wsl': "
        "weighted soft labels (Zhou et al., ICLR 2021), KD weighted per sample by 1 − exp(−CE_student/CE_teacher)")
    w_ce: float = Field(1.0, ge=0, description="weight of the CE term (KD's α-form: w_ce = 1 − α, w_logit = α)")
    w_logit: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing ε of the CE term (every method)")
    w_feat: float = Field(0.0, ge=0)
    tau: float = Field(4.0, gt=0)
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    dkd_warmup_epochs: int = Field(0, ge=0, description="linear warm-up of the DKD term (the DKD paper uses 20 of 240 epochs)")
    dist_beta: float = 1.0
    dist_gamma: float = 1.0
    ce_rule: Literal[CE_RULE_NAMES] = Field(  # type: ignore[valid-type]
        "plain", description="how the label term is formed per sample, on any method (lkd_ray/losses/ce_rules.py): "
        "'plain' CE; 'agree' CE only where the teacher's top class is the given label; 'agree_soft' CE weighted by the "
        "teacher's probability of the label; 'relabel' CE against the teacher's top class; 'gce' generalised CE "
        "(loss.gce_q); 'sce' symmetric CE (loss.sce_alpha, loss.sce_beta); 'boot_soft' / 'boot_hard' bootstrapping "
        "(loss.boot_beta); 'small_loss' CE on the batch's lowest-loss share (loss.forget_rate, ramped over "
        "loss.forget_ramp_epochs). With lossnet.kind=sample the network starts as this rule")
    gce_q: float = Field(0.7, gt=0, le=1, description="ce_rule=gce: q (q → 0 is CE, q = 1 is MAE)")
    sce_alpha: float = Field(0.1, ge=0, description="ce_rule=sce: weight of the CE part")
    sce_beta: float = Field(1.0, ge=0, description="ce_rule=sce: weight of the reverse-CE part")
    boot_beta: float = Field(0.95, ge=0, le=1, description="ce_rule=boot_*: weight of the given label (1 − β: the prediction)")
    forget_rate: float = Field(0.2, ge=0, lt=1, description="ce_rule=small_loss: share of each batch left out, at full ramp")
    forget_ramp_epochs: int = Field(2, ge=0, description="ce_rule=small_loss: epochs over which the left-out share "
                                    "rises linearly from 0 to forget_rate (0: from the start)")
    ramp_epochs: int = Field(0, ge=0, description="a hand-written schedule on the loss's scale and temperature: over "
                             "this many epochs the CE weight and the distillation term's weight rise linearly from 1× to "
                             "loss.ramp_weight× and its temperature to loss.ramp_tau× (on DIST, its inter-class term "
                             "only, as the per-sample network moves it); 0: no ramp. kd and dist only")
    ramp_weight: float = Field(1.0, gt=0, description="loss.ramp_epochs: the weights' factor at the ramp's end")
    ramp_tau: float = Field(1.0, gt=0, description="loss.ramp_epochs: the temperature's factor at the ramp's end")
    disagree_weight: float = Field(1.0, ge=0, le=1, description="the label term's weight on samples whose given label "
                                   "is not the teacher's top class, on any ce_rule (1: the rule as it is; 0 on 'plain': "
                                   "the 'agree' rule; below 1 on 'relabel': trust the teacher's relabelling less)")

    @model_validator(mode="after")
    def _ce_rule(self):
        if (self.ramp_weight != 1 or self.ramp_tau != 1) and not self.ramp_epochs:
            raise ValueError("loss.ramp_weight / loss.ramp_tau set a ramp's end, and loss.ramp_epochs is 0 (no ramp): "
                             "give loss.ramp_epochs, the epochs the ramp rises over")
        if self.ramp_epochs and self.method not in ("kd", "dist"):
            raise ValueError(f"loss.ramp_epochs schedules a hand-crafted kd or dist loss; loss.method={self.method!r} "
                             "has no such ramp (a learned loss learns its own schedule): use kd or dist")
        if self.disagree_weight != 1 and self.method == "ce":
            raise ValueError(f"loss.disagree_weight={self.disagree_weight:g} weighs samples by whether the teacher's top "
                             "class is the given label, and loss.method='ce' has no teacher: use a distillation method "
                             "(kd, dist, …) or leave it at 1")
        if self.ce_rule in TEACHER_CE_RULES and self.method == "ce":
            raise ValueError(f"loss.ce_rule={self.ce_rule!r} reads the teacher's logits, and loss.method='ce' has no "
                             "teacher: use a distillation method (kd, dist, …) or another rule")
        if self.label_smoothing and self.ce_rule in ("gce", "sce", "boot_soft", "boot_hard"):
            raise ValueError(f"loss.label_smoothing applies to CE-based rules; loss.ce_rule={self.ce_rule!r} defines its "
                             "own target: set one or the other")
        return self


LogitInput = Literal["log_ps", "log_pt", "ps", "pt", "onehot", "log_ratio"]
SampleInput = Literal["pt_y", "agree", "ce_s", "margin_s", "ent_s", "ent_t"]
SampleOutput = Literal["w_ce", "w_kd", "tau"]


class LossNetCfg(_Section):
    kind: Literal["class", "sample"] = Field(
        "class", description="'class': a residual on the base loss, one MLP per (sample, class) (the generic logit "
        "network); 'sample': per-sample weights on the CE and KD terms and a per-sample temperature from per-sample "
        "inputs (lossnet.sample_inputs → lossnet.sample_outputs), for scarce or noisy labels")
    sample_inputs: list[SampleInput] = Field(
        default_factory=lambda: ["pt_y", "agree", "ce_s", "margin_s", "ent_s", "ent_t"],
        description="kind=sample: the teacher's probability of the given label, teacher–label agreement, the student's "
        "CE, its margin p_y − max p_other, the student's and the teacher's entropy")
    sample_outputs: list[SampleOutput] = Field(default_factory=lambda: ["w_ce", "w_kd", "tau"],
                                               description="kind=sample: what the network sets per sample")
    base: Literal["kd", "dist", "none"] = Field(
        "kd", description="the hand-crafted loss the network starts as: kind=class adds its residual to it (none: no "
        "base); kind=sample weighs CE and this distillation term per sample (kd, or dist: DIST's per-sample "
        "inter-class term, its intra-class term unweighted)")
    inputs: list[LogitInput] = Field(default_factory=lambda: ["log_ps", "log_pt", "ps", "pt", "onehot"])
    hidden: list[int] = Field(default_factory=lambda: [32, 32])
    activation: Literal["silu", "softplus", "gelu", "tanh"] = "silu"
    state_inputs: bool = Field(False, description="feed training progress and running quiz accuracy to the loss networks")
    feature_hidden: list[int] = Field(default_factory=lambda: [16])
    lock: Literal["none", "norm", "nontarget"] = Field(
        "norm", description="(default 'norm': the long-horizon benchmark's choice, BENCHMARKS.md) scale lock on the learned logit gradient: 'norm' rescales it per batch to the base loss's "
        "gradient norm; 'nontarget' keeps the target-logit component at the base loss's and lets φ reshape only the "
        "non-target part (norm-locked there). φ then changes the direction of the gradient, not its size")
    trust: float | None = Field(0.5, gt=0, description="with a lock: the residual gradient's norm is at most trust × the "
                                "base gradient's (a cone of half-angle asin(trust) around the base gradient); None = unbounded")
    lock_scope: Literal["batch", "sample"] = Field(
        "batch", description="what a lock bounds: the batch's logit gradient as a whole (samples may trade size among "
        "themselves) or every sample's own")
    init_from: str | None = Field(None, description="start φ from a loss network learned earlier: a v<N>.pt file, a run "
                                  "folder holding lossnet/, or an s3:// URI of either")
    frozen: bool = Field(False, description="no meta-updates: train with the loss network as given (init_from) at KD's cost")

    @field_validator("inputs", "sample_inputs", "sample_outputs")
    @classmethod
    def _nonempty(cls, v):
        if not v or len(set(v)) != len(v):
            raise ValueError("inputs must be a non-empty list without repeats")
        return v


class MetaCfg(_Section):
    estimator: Literal["unroll", "implicit", "es"] = Field(
        "unroll", description="meta-gradient: 'unroll' (k differentiable student steps, greedy), 'implicit' (Neumann-series "
        "implicit differentiation, Lorraine et al. 2020), 'es' (antithetic evolution strategies over particles, each its "
        "own student; persistent by default, Vicol et al. 2021)")
    backend: Literal["higher", "torch.func"] = "higher"
    quiz_objective: Literal["ce", "calibrated", "error"] = Field(
        "calibrated", description="what the meta-step minimises on the quiz batch: 'ce'; 'calibrated' = CE after the best "
        "temperature for that batch (min over β of CE(β·z)), so a loss cannot score by making the student less "
        "confident, only by ranking better; 'error' = top-1 error (es only: it has no gradient)")
    scope: Literal["full", "head"] = "full"
    unroll_steps: int = Field(1, ge=1, le=16)
    meta_every: int = Field(40, ge=1, description="student steps per meta-step; on the offline benchmark 40 ties the best "
                            "quiz accuracy of any LKD setting and is the one that stays ≤ 1.15× KD (BENCHMARKS.md)")
    meta_steps_per_epoch: float | None = Field(
        None, gt=0, description="the meta-schedule in units of the data: this many meta-steps per epoch of the student's "
        "data (meta_every is then derived from the epoch's length, so a data set 7× smaller gets as many meta-steps per "
        "epoch); None: every meta_every student steps. The run's log says what it chose")
    min_meta_steps: int = Field(0, ge=0, description="at least this many meta-steps in the whole run, whatever its size "
                                "(meta_every is shortened to fit); 0: no floor")
    lr: float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "student"] = Field(
        "constant", description="'student': scale the meta lr by the student's lr schedule (lr_t / lr_0), so φ settles as "
        "the student converges instead of drifting on meta-gradients that shrink with the student's lr")
    clip_norm: float = Field(1.0, gt=0)
    batch_source: Literal["same", "fresh"] = "same"
    unroll_batch_size: int | None = Field(None, ge=1, description="unroll the virtual student step on the first N images "
                                          "of each training batch (a random subset: batches are shuffled); None: the "
                                          "whole batch. A meta-step's cost scales with it and data.quiz_batch_size")
    freeze_after_epoch: int | None = Field(None, ge=1, description="stop meta-updates after this many epochs (None: adapt for the whole run)")
    snapshot_every: int = Field(50, ge=1)
    p_snapshot: float = Field(0.2, ge=0, le=1)
    sampling: Literal["uniform", "recent", "gaussian"] = "uniform"
    max_snapshots: int | None = Field(None, ge=1, description="keep only the newest N snapshots (in memory and under Ray); "
                                      "None keeps every snapshot (the method's uniform-over-history)")
    snapshot_memory_mb: int | None = Field(1024, ge=1, description="single process: snapshots kept in host memory, in "
                                           "MiB; older ones spill to files under run.cache_dir (None: no bound). Under "
                                           "Ray they live in storage and Ray's object store (bounded there)")
    neumann_steps: int = Field(5, ge=0, le=200, description="implicit: Hessian-vector products in the Neumann series")
    neumann_alpha: float | None = Field(None, gt=0, description="implicit: the series' step (None: the student's current "
                                        "lr/(1 + momentum), which converges wherever the student's training is stable)")
    es_particles: int = Field(8, ge=2, description="es: particles (antithetic pairs × 2), each its own student")
    es_sigma: float = Field(0.05, gt=0, description="es: perturbation scale")
    es_params: Literal["all", "last"] = Field("last", description="es: perturb every φ entry or only the last layer's")
    es_persistent: bool = Field(True, description="es: persistent ES (perturbations accumulate over truncations: unbiased "
                                "for the whole run); False: plain antithetic ES per truncation")


class RunCfg(_Section):
    name: str = "lkd"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = Field(False, description="bf16 autocast on CUDA")
    channels_last: bool = False
    out_dir: str = "runs"
    cache_dir: str = ".cache/lkd_ray"
    progress: bool = True
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None leaves torch's default")
    log_every: int = Field(50, ge=1, description="student steps between host syncs: the loss scalars for progress and "
                           "the divergence check (a GPU step otherwise never waits for the host)")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", v) or ".." in v:
            raise ValueError(f"run name {v!r} must be 1-128 of [A-Za-z0-9._-], start alphanumeric and contain no '..' "
                             "(it becomes a storage prefix and must not escape it)")
        return v


class Config(_Section):
    model: ModelCfg = Field(default_factory=ModelCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    optim: OptimCfg = Field(default_factory=OptimCfg)
    loss: LossCfg = Field(default_factory=LossCfg)
    lossnet: LossNetCfg = Field(default_factory=LossNetCfg)
    meta: MetaCfg = Field(default_factory=MetaCfg)
    run: RunCfg = Field(default_factory=RunCfg)

    @model_validator(mode="after")
    def _consistent(self):
        if self.model.teacher_cache and self.loss.w_feat > 0:
            raise ValueError("model.teacher_cache caches the teacher's logits only; with loss.w_feat > 0 the teacher's "
                             "features are needed every step, so it runs live: turn one of them off")
        if self.model.teacher_cache and self.data.dataset not in ("fashion_mnist", "synthetic"):
            raise ValueError(f"model.teacher_cache is implemented for the in-memory data sets (fashion_mnist, synthetic), "
                             f"not {self.data.dataset!r} yet: set model.teacher_cache=false")
        if self.lossnet.frozen and self.lossnet.init_from is None and self.loss.method in ("lkd", "control"):
            raise ValueError("lossnet.frozen=true without lossnet.init_from trains with the initial loss network, which is "
                             "the base loss itself: give lossnet.init_from (a learned loss network) or use loss.method=kd")
        if self.lossnet.lock != "none" and self.lossnet.base == "none" and self.loss.method == "lkd" and \
                self.lossnet.kind == "class":
            raise ValueError(f"lossnet.lock={self.lossnet.lock} keeps the base loss's gradient norm, and lossnet.base=none has "
                             "none: use lossnet.base kd or dist, or lossnet.lock=none")
        if self.lossnet.kind == "sample" and self.lossnet.base == "none" and self.loss.method == "lkd":
            raise ValueError("lossnet.kind=sample weighs CE and a distillation term per sample: lossnet.base must be kd "
                             "or dist, not none")
        if self.lossnet.kind == "sample" and self.loss.method == "lkd":
            dead = [o for o, w in (("w_ce", self.loss.w_ce), ("w_kd", self.loss.w_logit)) if o in self.lossnet.sample_outputs and w == 0]
            if dead:  # a per-sample weight multiplies its term's weight: on a zero term it gets no gradient and never moves
                term = {"w_ce": "loss.w_ce (the CE term)", "w_kd": "loss.w_logit (the KD term)"}
                raise ValueError(f"lossnet.sample_outputs has {', '.join(dead)}, a per-sample multiplier on "
                                 f"{' and '.join(term[o] for o in dead)}, which is 0: it would never move. Give the term a "
                                 f"positive weight, or drop {', '.join(dead)} from lossnet.sample_outputs")
        if self.meta.quiz_objective == "error" and self.meta.estimator != "es":
            raise ValueError("meta.quiz_objective=error has no gradient: use it with meta.estimator=es, or use 'calibrated'")
        if self.meta.estimator == "es" and self.meta.es_particles % 2:
            raise ValueError(f"meta.es_particles must be even (antithetic pairs), got {self.meta.es_particles}")
        if self.data.labels_per_class is not None and self.data.train_subset is not None:
            raise ValueError("data.labels_per_class and data.train_subset both choose the student's images: set one of them")
        if (self.data.label_noise or self.data.labels_per_class or self.data.quiz_per_class) and \
                self.data.dataset == "parquet":
            raise ValueError("data.label_noise, data.labels_per_class and data.quiz_per_class are implemented for the "
                             "in-memory and torchvision data sets, not for parquet shards")
        if self.data.dataset == "imagenet" and self.data.channels != 3:
            raise ValueError("ImageNet images have 3 channels: set data.channels=3")
        if self.data.dataset in ("cifar10", "cifar100", "imagenet", "parquet") and not self.data.root:
            raise ValueError(f"data.root is required for {self.data.dataset}: the directory holding the data set (nothing is downloaded)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------- recipes
RECIPES: dict[str, dict[str, Any]] = {
    # Small offline recipe: Fashion-MNIST, small CNN pair, minutes on 2 CPU cores.
    "fashion_mnist": {
        "model": {"teacher": "cnn_teacher", "student": "cnn_student", "teacher_epochs": 5},
        "data": {"dataset": "fashion_mnist", "channels": 1, "batch_size": 128},
        "optim": {"lr": 0.05, "epochs": 4, "schedule": "cosine", "weight_decay": 5e-4},
    },
    # CIFAR-100 KD benchmark recipe (DESIGN §4): 240 epochs, batch 64, lr 0.05, ×0.1 at 150/180/210, wd 5e-4.
    # (Use lr 0.01 for MobileNetV2/ShuffleNet students.)
    "cifar100": {
        "model": {"teacher": "resnet32x4", "student": "resnet8x4"},
        "data": {"dataset": "cifar100", "channels": 3, "batch_size": 64, "num_workers": 4},
        "optim": {"lr": 0.05, "epochs": 240, "schedule": "multistep", "milestones": [150, 180, 210],
                  "gamma": 0.1, "weight_decay": 5e-4},
        "loss": {"tau": 4.0},
        # A full meta-step costs ~4.2 KD steps for this pair on a GPU (DESIGN §4: 35.5 vs 8.5 ms), so
        # ≤ 1.15× KD needs meta_every ≥ 28, plus the per-step cost of the loss network (BENCHMARKS.md).
        "meta": {"meta_every": 40},
    },
    # ImageNet KD recipe: 100 epochs, batch 256 (per job), lr 0.1, ×0.1 at 30/60/90, wd 1e-4, τ=1.
    "imagenet": {
        "model": {"teacher": "resnet34", "student": "resnet18", "teacher_weights": "torchvision:IMAGENET1K_V1"},
        "data": {"dataset": "imagenet", "channels": 3, "batch_size": 256, "num_workers": 8, "eval_batch_size": 256},
        "optim": {"lr": 0.1, "epochs": 100, "schedule": "multistep", "milestones": [30, 60, 90],
                  "gamma": 0.1, "weight_decay": 1e-4},
        "loss": {"tau": 1.0},
        # A full meta-step costs ~9.6 KD steps for R34→R18 (DESIGN §4: 275 vs 28.7 ms): meta_every ≥ 64 keeps ≤ 1.15× KD.
        "meta": {"meta_every": 64},
        "run": {"bf16": True, "channels_last": True},
    },
}


# Presets: loss settings chosen for a data regime by ``benchmarks/accuracy.py --regime R`` (the tuned row with the best
# mean quiz top-1 over five seeds among those not measured over the 1.25× cost bar; the clean quiz split only, never
# the test split) or, where ``source.suite`` is "field", by its field suite (issue 25: over seeds × noise draws,
# of the rows within one binomial SE of the best selection top-1 the lowest calibrated selection loss, within the
# cost bar, a learned row only if it beats the best hand-crafted row and travels; ``benchmarks.report.field_preset_pick``). Each names the tuning record it came from;
# tests/test_presets.py rebuilds every preset from benchmarks/results/accuracy_regimes_tuning.json, so a preset cannot
# drift from what was measured. A preset sets the loss, loss network and meta-step; the data stay the user's.
# Meta-schedules are stored in units of the data (meta.meta_steps_per_epoch): a meta-step every 80 of the regimes'
# 421 steps an epoch is 421/80 per epoch, the same run on its regime, and as many meta-steps per epoch on a data
# set of any size (a data set 7× smaller made 8 meta-steps in a whole run when presets counted steps).
PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "summary": "the whole clean training split, a strong teacher: the tuned DIST (τ 2; on clean labels no "
                   "noisy-label rule beat it) with its CE and inter-class weights and that term's temperature ramped "
                   "linearly to ×2 over the 12 epochs (`ramp`, the schedule the learned residual found on scarce, "
                   "written by hand) — of the field suite's finals rows within the selection split's noise of the best, "
                   "the lowest calibrated selection loss, within the cost bar. The learned residual on DIST is level "
                   "with it (no win), so a rule ships; the regimes benchmark's learned pick is `full-learned` "
                   "(BENCHMARKS.md, field suite). loss.ramp_epochs counts epochs: set it to your run's epochs",
        "source": {"regime": "full", "suite": "field", "method": "ramp-tuned", "trial": "w=2,tau=2"},
        "sections": {"loss": {"method": "dist", "tau": 2.0, "ramp_epochs": 12, "ramp_weight": 2.0, "ramp_tau": 2.0}},
    },
    "full-learned": {
        "summary": "the regimes benchmark's pick for full (its KD-literature grids only, picked on the quiz the "
                   "meta-step trains on), kept under this name: the per-sample loss network over DIST's term "
                   "(τ 2 from the tuned DIST; no lock, a meta-step every 80 steps, meta lr 1e-2) won on quiz over five "
                   "seeds; on test it is level with the tuned DIST (within noise); it learned a global rescaling (every "
                   "output at its upper bound), not a per-sample rule (BENCHMARKS.md)",
        "source": {"regime": "full", "method": "lkd-sample-dist-tuned", "trial": "lock=none,every=80,lr=0.01"},
        "sections": {"loss": {"tau": 2.0, "method": "lkd", "w_ce": 1.0, "w_logit": 1.0},
                     "lossnet": {"kind": "sample", "base": "dist", "lock": "none", "trust": None, "lock_scope": "batch"},
                     "meta": {"meta_steps_per_epoch": 421 / 80, "lr": 0.01}},
    },
    "noisy-sym40": {
        "summary": "40 % symmetric label noise, teacher trained on the noisy labels, a small clean quiz: the field "
                   "suite's best rule (small-loss selection, CE on the batch's lowest-loss 60 %, on DIST τ 2) with its "
                   "CE and DIST inter-class weights ramped linearly to ×2 over the 12 epochs (`ramp`, the schedule the "
                   "learned residual found on scarce, written by hand) — of the finals rows within the selection "
                   "split's noise of the best, the lowest calibrated selection loss, within the cost bar. The learned "
                   "residual on the rule stays near where it starts and is level with the rule (no win), so a rule "
                   "ships (BENCHMARKS.md, field suite). loss.ramp_epochs counts epochs: set it to your run's epochs",
        "source": {"regime": "noisy-sym40", "suite": "field", "method": "ramp-tuned", "trial": "w=2,tau=1"},
        "sections": {"loss": {"method": "dist", "tau": 2.0, "ce_rule": "small_loss", "forget_rate": 0.4,
                              "forget_ramp_epochs": 2, "ramp_epochs": 12, "ramp_weight": 2.0, "ramp_tau": 1.0}},
    },
    "noisy-pair30": {
        "summary": "30 % pair-flip label noise, teacher trained on the noisy labels, a small clean quiz: DIST (τ 1) with "
                   "CE against the teacher's top class (teacher relabelling, the field suite's best rule) at CE weight 2 "
                   "— of the finals rows within the selection split's noise of the best, the lowest calibrated "
                   "selection loss, within the cost bar (the tuning picks' rule). The learned residual on the rule is "
                   "level with it (no win), so a rule ships; the regimes benchmark's learned pick, which had "
                   "rediscovered a rule like it, is `noisy-pair30-learned` (BENCHMARKS.md, field suite)",
        "source": {"regime": "noisy-pair30", "suite": "field", "method": "rule-weights-tuned", "trial": "w_ce=2,w_logit=1"},
        "sections": {"loss": {"method": "dist", "tau": 1.0, "ce_rule": "relabel", "w_ce": 2.0, "w_logit": 1.0}},
    },
    "noisy-pair30-learned": {
        "summary": "the regimes benchmark's pick for noisy-pair30 (its KD-literature grids only, picked on the quiz the "
                   "meta-step trains on), kept under this name for its records: the per-sample loss network over DIST's "
                   "term (τ 1; norm lock, 421/80 meta-steps an epoch, meta lr 1e-2); what it learned is the agree rule "
                   "a practitioner writes by hand (BENCHMARKS.md, noisy-pair30 and the field suite)",
        "source": {"regime": "noisy-pair30", "method": "lkd-sample-dist-tuned", "trial": "lock=norm,every=80,lr=0.01"},
        "sections": {"loss": {"tau": 1.0, "method": "lkd", "w_ce": 1.0, "w_logit": 1.0},
                     "lossnet": {"kind": "sample", "base": "dist", "lock": "norm", "trust": None, "lock_scope": "batch"},
                     "meta": {"meta_steps_per_epoch": 421 / 80, "lr": 0.01}},
    },
    "noisy-pair45-8k": {
        "summary": "45 % pair-flip label noise (Co-teaching's Pair-45 %), a teacher trained on those labels and weak, "
                   "8,000 training images: CE against the teacher's top class (teacher relabelling, the rules' pick) "
                   "with the distillation term off (DIST τ 2 at weight 0) — of the finals rows within the selection "
                   "split's noise of the best, the lowest calibrated selection loss, within the cost bar (the tuning "
                   "picks' rule). A learned residual on it beats it on test but costs about 1.4× KD's whole run, over "
                   "the bar, and its cheaper schedules do not keep the gain (BENCHMARKS.md, field suite)",
        "source": {"regime": "noisy-pair45-8k", "suite": "field", "method": "rule-weights-tuned", "trial": "w_ce=1,w_logit=0"},
        "sections": {"loss": {"method": "dist", "tau": 2.0, "ce_rule": "relabel", "w_ce": 1.0, "w_logit": 0.0}},
    },
    "scarce": {
        "summary": "100 labels per class, a strong teacher trained on plenty of data, a 20-per-class quiz: the field "
                   "suite's best rule (soft bootstrapping, β 0.8, on DIST τ 2) with its CE and DIST inter-class weights "
                   "and that term's temperature ramped linearly to ×2 over the 40 epochs — the schedule the learned "
                   "residual found there, written by hand (`ramp`); the residual is level with it (no win), so the ramp "
                   "ships, at KD's cost (BENCHMARKS.md, field suite). loss.ramp_epochs counts epochs: set it to your "
                   "run's epochs",
        "source": {"regime": "scarce", "suite": "field", "method": "ramp-tuned", "trial": "w=2,tau=2"},
        "sections": {"loss": {"method": "dist", "tau": 2.0, "ce_rule": "boot_soft", "boot_beta": 0.8, "ramp_epochs": 40,
                              "ramp_weight": 2.0, "ramp_tau": 2.0}},
    },
}


def _deep_update(base: dict, upd: dict) -> dict:
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def parse_override(text: str) -> dict[str, Any]:
    """``meta.scope=head`` → ``{"meta": {"scope": "head"}}``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value, e.g. meta.scope=head")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override {text!r}: malformed key {key!r}")
    value: Any = yaml.safe_load(raw) if raw.strip() else None
    out: dict[str, Any] = {}
    cur = out
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            section = Config
            for part in e["loc"][:-1]:
                field = section.model_fields.get(str(part))
                section = field.annotation if field is not None else section
            valid = ", ".join(section.model_fields) if isinstance(section, type) and issubclass(section, BaseModel) else "?"
            lines.append(f"unknown field {loc!r}; valid fields here: {valid}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{loc or 'config'}: {msg} (got {e.get('input')!r})" if e["type"] != "value_error" else f"{loc or 'config'}: {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def build_config(recipe: str | None = "fashion_mnist", file: str | Path | None = None,
                 overrides: list[str] | tuple[str, ...] = (), preset: str | None = None,
                 **sections: dict[str, Any]) -> Config:
    """recipe → preset → YAML file → keyword sections → ``a.b=v`` overrides, validated once at the end."""
    data: dict[str, Any] = {}
    if recipe is not None:
        if recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {recipe!r}; valid recipes: {', '.join(RECIPES)}")
        data = copy.deepcopy(RECIPES[recipe])
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS) or '(none)'}")
        _deep_update(data, copy.deepcopy(PRESETS[preset]["sections"]))
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections (model, data, optim, loss, lossnet, meta, run)")
        _deep_update(data, loaded)
    _deep_update(data, copy.deepcopy(sections))
    for o in overrides:
        _deep_update(data, parse_override(o))
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e)) from None


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def with_absolute_paths(cfg: Config) -> Config:
    """A copy whose local, relative file paths are absolute (resolved against this process's working directory):
    what a driver hands to Ray workers and Tune trials, which run in other working directories. Only paths that
    exist here change; URIs (``s3://``, ``http://``), names (``torchvision``) and paths meant for other machines
    are left as given."""
    import os

    out = cfg.model_copy(deep=True)
    out.run.cache_dir = os.path.abspath(out.run.cache_dir)
    for section, name in (("data", "root"), ("data", "noisy_labels"), ("data", "trusted"), ("model", "teacher_weights"),
                          ("lossnet", "init_from")):
        sec = getattr(out, section)
        value = getattr(sec, name, None)
        if isinstance(value, str) and value and "://" not in value and not os.path.isabs(value) and os.path.exists(value):
            setattr(sec, name, os.path.abspath(value))
    return out
