"""The trainer: one certified-training run from a :class:`~tightrope.train.TrainConfig`.

Each step (Shi et al. 2021's recipe, shared by SABR, TAPS and the expressive losses): the phase
and eps of the step from the :class:`~tightrope.train.Schedule` -> the loss of the phase
(cross-entropy during the natural warm-up, with an IBP pass on a 1e-6 box for Shi's
regularisers when they are on; the method's ramp loss during the ramp (plain IBP for TAPS,
SABR's small-box IBP for STAPS: the registry entry's ``ramp``); otherwise the
configured method with its beta/kappa following ``eps_t / eps_max``) wrapped with L1 and Shi's
regularisers -> non-finite check -> backward -> gradient averaging across processes ->
grad-norm clipping -> Adam step. Each epoch: evaluation on the validation split,
``metrics.csv``, TensorBoard, ``last.pt`` and, once eps is full, ``best.pt`` when the run's
model-selection rule (:class:`~tightrope.losses.ModelSelection`, the method's paper's unless
``evaluation.selection`` says otherwise) picks the epoch: every epoch for ``last``, an
improvement of the validation metric for ``best_verified``/``best_taps``. The rule is written to
``meta.json``, announced through ``on_message`` and stored in every checkpoint's ``best``.

The library never prints: progress goes to the ``on_progress`` callback and messages to
``on_message``.

Example::

    config = load_config("configs/fashion_mnist/cpu_ibp.yaml")
    run = create_run_dir("runs", config)
    trainer = Trainer(config, run_dir=run, device="cpu")
    result = trainer.fit()
    result.best["verified_accuracy"]
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tightrope.attacks import PGDConfig
from tightrope.losses import (
    METHODS,
    CertifiedLoss,
    IBPConfig,
    IBPLoss,
    ModelSelection,
    Regularized,
    RegularizerConfig,
    StandardConfig,
    StandardLoss,
    STAPSConfig,
    TAPSConfig,
    WarmupConfig,
    WarmupLoss,
    ibp_initialize,
)
from tightrope.train.__about__ import __version__
from tightrope.train.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from tightrope.train.config import NO_IBP_PASS, LoaderKind, TrainConfig
from tightrope.train.data import Augmentation, DatasetName, Splits, load_splits, synthetic
from tightrope.train.evaluation import EvalSettings, evaluate, summarise
from tightrope.train.loader import Shard, TensorLoader
from tightrope.train.models import build_model
from tightrope.train.rundir import MetricsTable, package_versions, write_provenance
from tightrope.train.schedules import Phase, Schedule

__all__ = ["Distributed", "FitResult", "NonFiniteLossError", "Progress", "Trainer"]



class BatchLoader(Protocol):
    """What the trainer needs of a training loader (:class:`~tightrope.train.TensorLoader`,
    :class:`~tightrope.train.ffcv_loader.FFCVLoader`)."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]: ...


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the epoch and step and the
    checkpoint that still holds the last good state."""


@dataclass(frozen=True, slots=True)
class Distributed:
    """This process's place in a data-parallel run (``torchrun``): rank and world size."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True, slots=True)
class Progress:
    """One training step, for a progress bar: epoch ``epoch`` (0-based) of ``epochs``, batch
    ``batch`` (0-based) of ``batches``, global ``step``, the step's eps and loss, and the
    seconds spent in this epoch so far."""

    epoch: int
    epochs: int
    batch: int
    batches: int
    step: int
    eps: float
    loss: float
    elapsed: float


@dataclass(frozen=True, slots=True)
class FitResult:
    """What :meth:`Trainer.fit` returns: the run directory, the last epoch's validation metrics,
    those of the selected (best) epoch, and the rule that selected it."""

    run_dir: Path | None
    last: dict[str, float]
    best: dict[str, float]
    best_epoch: int
    selection: ModelSelection = ModelSelection.BEST_VERIFIED


def _key(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part + 1) % (2**63 - 1)
    return value


class Trainer:
    """A training run.

    Args:
        config: the validated configuration.
        run_dir: where checkpoints, metrics and TensorBoard events go (``None``: nowhere; for
            tests of single epochs).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        splits: data to use instead of loading ``config.data`` (tests).
        distributed: this process's rank and world size (the process group must be set up).
        on_progress: called after every optimiser step.
        on_message: called with human-readable notes (resumption, new best epoch).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        run_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        splits: Splits | None = None,
        distributed: Distributed | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        on_message: Callable[[str], None] | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        self.config = config
        #: The command line that started the run, written to ``meta.json`` (``argv``).
        self.command = None if command is None else list(command)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if self.run_dir is not None and (distributed is None or distributed.is_main):
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(device)
        self.dtype = config.precision.dtype
        self.distributed = distributed if distributed is not None else Distributed()
        self.on_progress = on_progress
        self.on_message = on_message
        self.splits = splits if splits is not None else self._load_data()
        info = self.splits.info
        shard = Shard(self.distributed.rank, self.distributed.world)
        augmentation = info.augmentation if config.data.augment else Augmentation.NONE
        self.train_loader: BatchLoader
        if config.data.loader is LoaderKind.FFCV:
            from tightrope.train.ffcv_loader import FFCVLoader

            cache = (Path(config.data.cache_dir) if config.data.cache_dir is not None
                     else Path.home() / ".cache" / "tightrope" / "ffcv")
            self.train_loader = FFCVLoader(
                self.splits.train, cache_dir=cache,
                tag=f"{config.data.dataset.value}-train", batch_size=config.data.batch_size,
                shuffle=True, seed=config.seed, augmentation=augmentation,
                crop_padding=info.crop_padding, drop_last=True, device=self.device,
                dtype=self.dtype, shard=shard, workers=config.data.workers,
            )
        else:
            self.train_loader = TensorLoader(
                self.splits.train, batch_size=config.data.batch_size, shuffle=True,
                seed=config.seed, augmentation=augmentation, crop_padding=info.crop_padding,
                drop_last=True, device=self.device, dtype=self.dtype, shard=shard,
            )
        validation = self.splits.validation if len(self.splits.validation) else self.splits.test
        self.validation_loader = TensorLoader(
            validation, batch_size=config.data.eval_batch_size, shuffle=False,
            device=self.device, dtype=self.dtype, shard=shard,
        )
        self.schedule = Schedule(config.eps, len(self.train_loader))
        self.model_kwargs: dict[str, Any] = {
            "in_channels": info.shape[0], "input_size": info.shape[1],
            "num_classes": info.num_classes, "mean": list(info.mean), "std": list(info.std),
            **dict(config.model.options),
        }
        self.model = self._build_model()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.optim.lr,
                                          weight_decay=config.optim.weight_decay)
        self.loss_generator = torch.Generator(device=self.device).manual_seed(
            _key(config.seed, self.distributed.rank, 1)
        )
        self.loss_config = config.loss.loss_config()
        self.selection = config.selection
        self.beta_schedule = config.beta_schedule
        self.kappa_schedule = config.kappa_schedule
        self.epoch = 0
        self.step = 0
        self.batch = 0
        self.sums: dict[str, float] = {}
        self.best: dict[str, float] = {}
        self.best_epoch = -1
        self.last_metrics: dict[str, float] = {}
        self._writer: Any = None
        self._first_step = 0
        self.metrics_table = (MetricsTable(self.run_dir / "metrics.csv")
                              if self.run_dir is not None else None)

    # ------------------------------------------------------------------------------- set-up
    def _load_data(self) -> Splits:
        data = self.config.data
        if data.dataset is DatasetName.SYNTHETIC:
            from tightrope.train.data import DATASET_INFO, ImageData

            train, test = synthetic(num_train=data.synthetic_size,
                                    num_test=max(data.synthetic_size // 4, 1),
                                    seed=self.config.seed)
            size = min(data.validation_size, len(train) - 1)
            order = torch.randperm(len(train),
                                   generator=torch.Generator().manual_seed(self.config.seed))
            return Splits(train.subset(order[size:].sort().values), train.subset(order[:size]),
                          test, DATASET_INFO[DatasetName.SYNTHETIC]) if size > 0 else Splits(
                train, ImageData(train.images[:0], train.labels[:0]), test,
                DATASET_INFO[DatasetName.SYNTHETIC])
        return load_splits(data.dataset, data.root, validation_size=data.validation_size,
                           seed=self.config.seed)

    def _build_model(self) -> nn.Sequential:
        # Initialisation draws from a seeded fork of the global generator, which is restored
        # afterwards: the library never reseeds the caller's randomness.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_key(self.config.seed, 2))
            model = build_model(self.config.model.name, **self.model_kwargs)
        if self.config.regularizers.ibp_init:
            ibp_initialize(model, torch.Generator().manual_seed(_key(self.config.seed, 3)))
        model = model.to(device=self.device, dtype=self.dtype)
        if self.distributed.world > 1:
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)
        return model

    # ------------------------------------------------------------------------------ the loss
    def loss_for_step(self, step: int) -> CertifiedLoss:
        """The loss of ``step``: its phase's loss, scheduled weights and regularisers."""
        config = self.config
        phase = self.schedule.phase(step)
        base: CertifiedLoss
        bound_based = config.loss.method not in NO_IBP_PASS
        regs = config.regularizers
        if phase is Phase.WARMUP:
            if bound_based and regs.shi_lambda > 0 and regs.warmup_eps > 0:
                # Shi et al.'s code regularises the warm-up too, on a box of radius 1e-6.
                base = WarmupLoss(WarmupConfig(min_eps=regs.warmup_eps,
                                               batchnorm=self._batchnorm_policy()))
            else:
                base = StandardLoss(StandardConfig())
                bound_based = False
        elif phase is Phase.RAMP and config.loss.uses_ibp_during_ramp:
            method = METHODS[config.loss.method]
            base = (method.build_ramp(self.loss_config, self.loss_generator)
                    if method.ramp is not None
                    else IBPLoss(IBPConfig(batchnorm=self._batchnorm_policy())))
            bound_based = True
        else:
            loss_config = self.loss_config
            changes: dict[str, float] = {}
            if self.beta_schedule is not None and hasattr(loss_config, "beta"):
                changes["beta"] = self.schedule.interpolate(self.beta_schedule, step)
            if self.kappa_schedule is not None and hasattr(loss_config, "kappa"):
                changes["kappa"] = self.schedule.interpolate(self.kappa_schedule, step)
            if changes:
                loss_config = dataclasses.replace(loss_config, **changes)
            base = METHODS[config.loss.method].build(loss_config, self.loss_generator)
        weight = self.schedule.regularizer_weight(regs.shi_lambda, step) if bound_based else 0.0
        if regs.l1 > 0 or weight > 0:
            return Regularized(base, RegularizerConfig(l1=regs.l1, tightness=weight,
                                                       relu_balance=weight, tau=regs.tau))
        return base

    def _batchnorm_policy(self) -> Any:
        loss_config = self.loss_config
        if isinstance(loss_config, STAPSConfig):
            return loss_config.taps.batchnorm
        return getattr(loss_config, "batchnorm", IBPConfig().batchnorm)

    # ----------------------------------------------------------------------------- training
    def train_one_epoch(self) -> dict[str, float]:
        """Train epoch ``self.epoch`` from batch ``self.batch`` on (resumption) to its end.

        Returns:
            Means over the epoch's samples of ``loss`` and of the loss's metrics (e.g.
            ``robust_loss``, ``ibp_verified_accuracy``), plus the final ``eps`` and ``lr``.

        Raises:
            NonFiniteLossError: the loss became NaN/inf (nothing is saved for that step).
        """
        config = self.config
        model, optimizer = self.model, self.optimizer
        lr = config.optim.lr_at(self.epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        started = time.perf_counter()
        batches = len(self.train_loader)
        eps = self.schedule.eps_at(self.step)
        for x, y in self.train_loader.epoch(self.epoch, start=self.batch):
            eps = self.schedule.eps_at(self.step)
            out = self.loss_for_step(self.step)(model, x, y, eps)
            value = float(out.loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"the training loss is {value} at epoch {self.epoch + 1}, batch "
                    f"{self.batch + 1} (step {self.step}, eps {eps:.6g}); the last good state is "
                    f"{self._last_path()}. Lower optim.lr, keep optim.grad_clip > 0 or lengthen "
                    "eps.ramp_epochs, then resume or restart"
                )
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(out.loss)
            if self.distributed.world > 1:
                self._average_gradients()
            if config.optim.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            optimizer.step()
            count = float(x.shape[0])
            self.sums["samples"] = self.sums.get("samples", 0.0) + count
            self.sums["loss"] = self.sums.get("loss", 0.0) + value * count
            for name, metric in out.metrics.items():
                self.sums[name] = self.sums.get(name, 0.0) + float(metric) * count
            self.step += 1
            self.batch += 1
            if self.on_progress is not None:
                self.on_progress(Progress(self.epoch, config.epochs, self.batch - 1, batches,
                                          self.step, eps, value, time.perf_counter() - started))
            every = config.checkpoint.every_steps
            if every and self.step % every == 0 and self.batch < batches and self._checkpoints:
                self.save("last.pt")
        samples = max(self.sums.pop("samples", 0.0), 1.0)
        means = {name: total / samples for name, total in self.sums.items()}
        means.update(eps=eps, lr=lr)
        self.sums = {}
        self.batch = 0
        self.epoch += 1
        if self.distributed.world > 1:
            self._average_batchnorm_statistics()
        return means

    def _average_gradients(self) -> None:
        # The arithmetic of DistributedDataParallel: every process holds the same weights and
        # takes the mean of all processes' gradients. The model is not wrapped in DDP because
        # the bound passes walk its layers directly instead of calling its forward.
        world = float(self.distributed.world)
        for parameter in self.model.parameters():
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)
                parameter.grad.div_(world)

    def _average_batchnorm_statistics(self) -> None:
        # Training normalises each process's batch by its own statistics (as DDP without
        # SyncBatchNorm); the running statistics used in eval mode are averaged at epoch ends.
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                for buffer in (module.running_mean, module.running_var):
                    if buffer is not None:
                        dist.all_reduce(buffer)
                        buffer.div_(float(self.distributed.world))

    # --------------------------------------------------------------------------- evaluation
    def eval_settings(self, max_samples: int | None = None) -> EvalSettings:
        evaluation = self.config.evaluation
        taps: TAPSConfig | None = None
        if isinstance(self.loss_config, TAPSConfig):
            taps = self.loss_config
        elif isinstance(self.loss_config, STAPSConfig):
            taps = self.loss_config.taps
        return EvalSettings(
            eps=self.config.eps.test_eps,
            pgd=PGDConfig(steps=evaluation.pgd_steps, restarts=evaluation.pgd_restarts),
            crown_ibp=evaluation.crown_ibp, taps=taps, seed=_key(self.config.seed, 4),
            max_samples=max_samples,
        )

    def evaluate(self, loader: TensorLoader | None = None, *, whole: bool = False
                 ) -> dict[str, float]:
        """Accuracies on the validation split (or ``loader``) at the test eps; see
        :func:`tightrope.train.evaluate`. At most ``evaluation.max_samples`` samples unless
        ``whole``. Under data parallelism each process evaluates its shard and the counts are
        summed."""
        loader = loader if loader is not None else self.validation_loader
        limit = None if whole else self.config.evaluation.max_samples
        if limit is not None and self.distributed.world > 1:
            limit = -(-limit // self.distributed.world)
        metrics = evaluate(self.model, loader.epoch(0), self.eval_settings(limit))
        if self.distributed.world > 1:
            names = sorted(name for name in metrics if name == "samples" or name.endswith("_count"))
            totals = torch.tensor([metrics[name] for name in names], dtype=torch.float64,
                                  device=self.device)
            dist.all_reduce(totals)
            metrics = summarise(dict(zip(names, totals.tolist(), strict=True)))
        return metrics

    def test_loader(self) -> TensorLoader:
        """The test split (for a final report only; never used for model selection)."""
        return TensorLoader(self.splits.test, batch_size=self.config.data.eval_batch_size,
                            shuffle=False, device=self.device, dtype=self.dtype,
                            shard=Shard(self.distributed.rank, self.distributed.world))

    # ---------------------------------------------------------------------------- the run
    def fit(self) -> FitResult:
        """Train the remaining epochs, evaluating, logging and checkpointing each one."""
        config = self.config
        main = self.distributed.is_main and self.run_dir is not None
        self._first_step = self.step  # TensorBoard drops events after it (a resumed run)
        if main and self.run_dir is not None and not (self.run_dir / "config.yaml").is_file():
            write_provenance(self.run_dir, config, {
                "device": str(self.device), "world_size": self.distributed.world,
                "steps_per_epoch": len(self.train_loader),
                "train_samples": len(self.splits.train),
                "validation_samples": len(self.splits.validation),
                **self.resolved_schedules(),
                **({} if self.command is None else {"argv": self.command}),
            })
        if self.distributed.is_main and self.on_message is not None:
            self.on_message(f"model selection: {self.selection.value} "
                            f"({self._selection_source()})")
        if main and self.metrics_table is not None:
            self.metrics_table.load(keep_epochs_up_to=self.epoch)
        try:
            while self.epoch < config.epochs:
                epoch_started = time.perf_counter()
                train_metrics = self.train_one_epoch()
                seconds = time.perf_counter() - epoch_started
                last_epoch = self.epoch == config.epochs
                metrics: dict[str, float] = {}
                if self.epoch % config.evaluation.every_epochs == 0 or last_epoch:
                    metrics = self.evaluate()
                    self.last_metrics = metrics
                    self._select(metrics)
                if main:
                    self._log(train_metrics, metrics, seconds)
                if self._checkpoints:
                    self.save("last.pt")
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        if self._checkpoints and self.best_epoch < 0:
            self.save("best.pt")  # eps never reached its final value: the last state
        if self.distributed.world > 1:
            dist.barrier()  # every process may read the checkpoints once fit returns
        return FitResult(self.run_dir, self.last_metrics, self.best or self.last_metrics,
                         self.best_epoch if self.best_epoch >= 0 else self.epoch,
                         self.selection)

    def resolved_schedules(self) -> dict[str, Any]:
        """What the run resolved from its config's defaults, for ``meta.json``: the
        model-selection rule and where it came from, and CROWN-IBP's beta/kappa schedules."""
        return {
            "model_selection": self.selection.value,
            "model_selection_source": self._selection_source(),
            "beta_schedule": list(self.beta_schedule) if self.beta_schedule else None,
            "kappa_schedule": list(self.kappa_schedule) if self.kappa_schedule else None,
        }

    def _selection_source(self) -> str:
        if self.config.evaluation.selection is not None:
            return "evaluation.selection"
        return f"the default of {self.config.loss.method}"

    def _select(self, metrics: dict[str, float]) -> None:
        # Model selection on the validation split once eps has reached its final value, by the
        # run's rule: every such epoch replaces the last (LAST), or the best validation score.
        if self.schedule.phase(self.step - 1) is not Phase.FULL:
            return
        metric = self.selection.metric
        if metric is not None:
            score = (metrics.get(metric, 0.0), metrics.get("clean_accuracy", 0.0))
            best = (self.best.get(metric, -1.0), self.best.get("clean_accuracy", -1.0))
            if not score > best:
                return
        self.best = dict(metrics)
        self.best_epoch = self.epoch
        if self._checkpoints:
            self.save("best.pt")
        if metric is not None and self.distributed.is_main and self.on_message is not None:
            self.on_message(
                f"epoch {self.epoch}: new best ({metric} {score[0]:.4f}, clean "
                f"{score[1]:.4f} on validation)"
            )

    def _log(self, train: dict[str, float], val: dict[str, float], seconds: float) -> None:
        row: dict[str, Any] = {"epoch": self.epoch, "step": self.step, "epoch_seconds": seconds}
        row.update({f"train/{k}": v for k, v in train.items()})
        row.update({f"val/{k}": v for k, v in val.items() if not k.endswith("_count")})
        if self.metrics_table is not None:
            self.metrics_table.append(row)
        writer = self._tensorboard()
        for name, value in row.items():
            if name not in ("epoch", "step"):
                writer.add_scalar(name, value, self.step)
        writer.flush()

    def _tensorboard(self) -> Any:
        if self._writer is None:
            assert self.run_dir is not None  # only the main process with a run dir logs
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:  # pragma: no cover - depends on the environment
                raise ImportError("logging needs the tensorboard package: "
                                  "`pip install tensorboard`") from error
            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"),
                                         purge_step=self._first_step)
        return self._writer

    # -------------------------------------------------------------------------- checkpoints
    def _last_path(self) -> str:
        if self.run_dir is None:
            return "not saved (no run directory)"
        path = self.run_dir / "last.pt"
        return str(path) if path.is_file() else "not saved yet (no checkpoint written)"

    @property
    def _checkpoints(self) -> bool:
        # Under data parallelism every process joins the collective part of save().
        return self.run_dir is not None or self.distributed.world > 1

    def _generator_states(self) -> dict[str, Any]:
        own = self.loss_generator.get_state()
        if self.distributed.world == 1:
            return {"loss": own}
        gathered: list[Any] = [None] * self.distributed.world
        dist.all_gather_object(gathered, own)
        return {"loss": gathered[0], "loss_per_rank": gathered}

    def state(self, rng: dict[str, Any] | None = None) -> dict[str, Any]:
        """The checkpoint payload (plain containers; ``weights_only``-loadable)."""
        info = self.splits.info
        rng = rng if rng is not None else {"loss": self.loss_generator.get_state()}
        return {
            "format": CHECKPOINT_FORMAT,
            "model": {"name": self.config.model.name, "kwargs": dict(self.model_kwargs),
                      "state_dict": self.model.state_dict()},
            "dataset": {"name": self.config.data.dataset.value, "input_shape": list(info.shape),
                        "num_classes": info.num_classes, "mean": list(info.mean),
                        "std": list(info.std)},
            "eps": {"train": self.config.eps.train, "test": self.config.eps.test_eps},
            "config": self.config.to_plain(),
            "epoch": self.epoch,
            "step": self.step,
            "batch": self.batch,
            "optimizer": self.optimizer.state_dict(),
            "rng": rng,
            "progress": dict(self.sums),
            "best": {"metrics": dict(self.best), "epoch": self.best_epoch,
                     "selection": self.selection.value},
            "last_metrics": dict(self.last_metrics),
            "versions": {"tightrope-train": __version__, **package_versions()},
        }

    def save(self, name: str) -> Path | None:
        """Write the checkpoint ``name`` (``last.pt``, ``best.pt``) into the run directory.

        Under data parallelism every process must call it (the processes' generator states are
        gathered); the main process writes the file and the others return ``None``.
        """
        rng = self._generator_states()
        if not self.distributed.is_main:
            return None
        if self.run_dir is None:
            raise ValueError("this trainer has no run directory to save into")
        path = self.run_dir / name
        save_checkpoint(path, self.state(rng))
        return path

    def restore(self, path: str | Path) -> None:
        """Continue from a checkpoint of this run: weights, optimizer, loss RNG, epoch, step,
        position in the epoch, running sums and the best epoch so far.

        Raises:
            CheckpointError: (a ``ValueError``) the file cannot serve (see
                :func:`~tightrope.train.load_checkpoint`), lacks the resumption state, or its
                weights or optimizer state do not fit this trainer or are not finite.
        """
        stored = load_checkpoint(path, map_location=self.device, resume=True).raw
        load_weights(self.model, stored["model"]["state_dict"], source=str(path))
        try:
            for moments in stored["optimizer"]["state"].values():
                for name, value in dict(moments).items():
                    if (isinstance(value, torch.Tensor) and value.is_floating_point()
                            and not bool(torch.isfinite(value).all())):
                        raise CheckpointError(
                            f"{path}: the optimizer's {name} holds NaN or infinite values; use "
                            "an earlier checkpoint such as best.pt"
                        )
            self._restore_state(stored)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:
            reason = (str(error).splitlines() or [""])[0]
            raise CheckpointError(f"{path}: its training state does not fit this run "
                                  f"({type(error).__name__}: {reason})") from error
        if self.on_message is not None:
            self.on_message(f"resumed from {path}: epoch {self.epoch + 1}, batch "
                            f"{self.batch + 1}, step {self.step}")

    def _restore_state(self, stored: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(stored["optimizer"])
        per_rank = stored["rng"].get("loss_per_rank")
        if per_rank is not None and len(per_rank) == self.distributed.world:
            self.loss_generator.set_state(per_rank[self.distributed.rank].cpu())
        else:
            self.loss_generator.set_state(stored["rng"]["loss"].cpu())
        self.epoch = int(stored["epoch"])
        self.step = int(stored["step"])
        self.batch = int(stored["batch"])
        self.sums = {str(k): float(v) for k, v in stored["progress"].items()}
        best = stored["best"]
        self.best = {str(k): float(v) for k, v in best["metrics"].items()}
        self.best_epoch = int(best["epoch"])
        self.last_metrics = {str(k): float(v) for k, v in stored["last_metrics"].items()}
