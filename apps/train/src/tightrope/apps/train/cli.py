"""``tightrope-train``: a certified-training run from a YAML config.

    tightrope-train --config configs/fashion_mnist/cpu_ibp.yaml
    tightrope-train --config configs/cifar10/eps2_255/sabr.yaml --device cuda optim.lr=1e-3
    tightrope-train --resume runs/fashion_mnist-ibp-cnn3-20260101-120000
    torchrun --nproc-per-node 2 -m tightrope.apps.train.cli --config ...   (or the script)

Exit status: 0 done; 2 a bad config or command line, a missing data set, a --resume checkpoint
that cannot serve, or an output that cannot be written (one line on stderr says what to do; a
new run directory that holds no checkpoint yet is removed again); 3 a non-finite loss
(``last.pt`` keeps the last good state).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import torch

from tightrope.apps.train.__about__ import __version__
from tightrope.bounds import compile_kernels, flush_denormals, keep_freed_memory
from tightrope.train import (
    CheckpointError,
    ConfigError,
    DatasetNotFoundError,
    Distributed,
    NonFiniteLossError,
    Progress,
    TrainConfig,
    Trainer,
    create_run_dir,
    load_checkpoint,
    load_config,
    parse_config,
    write_text_atomic,
)

__all__ = ["ProgressPrinter", "build_parser", "main"]

EPILOG = """\
overrides:
  Any config key can be set after the options as key.sub=value (the value is read as YAML),
  e.g.  epochs=3  optim.lr=1e-3  eps.train=2/255  loss.options.alpha=0.3  data.root=/data.
  They are validated like the file itself.

run directory (--out/<dataset>-<method>-<model>-<time>/):
  config.yaml (resolved config), meta.json (git SHA, versions, device), metrics.csv (one row
  per epoch), tensorboard/ (view with `tensorboard --logdir <run>/tensorboard`), last.pt
  (latest state; --resume continues from it), best.pt (the epoch kept once eps is full, by
  the method's paper's model-selection rule: the last epoch for SABR, CC-/MTL-/Exp-IBP, PGD
  and standard training; the best IBP/CROWN-IBP-verified validation epoch for IBP, CROWN-IBP
  and Lee; the best TAPS-estimated one for TAPS/STAPS; evaluation.selection=last,
  best_verified or best_taps overrides it; the rule is printed and stored in meta.json and the
  checkpoints), test_metrics.json (best.pt on the test split, unless --no-test).

multi-process:
  torchrun --nproc-per-node N $(which tightrope-train) --config ...  trains data-parallel
  (gloo on CPU, NCCL on CUDA); --device cuda picks cuda:LOCAL_RANK.

exit status: 0 done; 2 bad config or options, missing data set, a --resume checkpoint that
cannot serve (truncated, foreign, incomplete, non-finite) or an output that cannot be written
(no permission, disk full; a new run directory without a checkpoint is removed again, and an
existing last.pt is never lost); 3 non-finite loss (last.pt keeps the last good state).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tightrope-train",
        description="Train a certifiably robust network from a YAML config (see configs/).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path,
                        help="YAML training config (required unless --resume)")
    parser.add_argument("--out", type=Path, default=Path("runs"),
                        help="parent directory of the new run directory (default: runs)")
    parser.add_argument("--resume", type=Path, metavar="RUN",
                        help="continue the run in directory RUN from its last.pt, exactly "
                             "(its stored config is used; no --config or overrides)")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N or auto (cuda when available; default auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--no-test", action="store_true",
                        help="skip the final evaluation of best.pt on the test split")
    parser.add_argument("--quiet", action="store_true", help="no per-step progress output")
    parser.add_argument("--no-compile", action="store_true",
                        help="run bound computations eagerly; by default the ReLU step of "
                             "CROWN-style bounds (CROWN-IBP, Lee, evaluation) is compiled by "
                             "torch.compile: seconds of compilation at its first use, faster "
                             "steps after (tightrope.bounds.compile_kernels)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. optim.lr=1e-3 epochs=3")
    return parser


class ProgressPrinter:
    """A progress bar with ETA on a terminal; a line every tenth of an epoch otherwise."""

    def __init__(self, stream: TextIO, quiet: bool = False) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.quiet = quiet
        self.run_started = time.perf_counter()
        self.steps_at_start: int | None = None

    def __call__(self, progress: Progress) -> None:
        if self.quiet:
            return
        if self.steps_at_start is None:
            self.steps_at_start = progress.step - 1
        done = progress.batch + 1
        rate = progress.elapsed / done
        epoch_eta = rate * (progress.batches - done)
        total_left = epoch_eta + rate * progress.batches * (progress.epochs - progress.epoch - 1)
        text = (f"epoch {progress.epoch + 1}/{progress.epochs} batch {done}/{progress.batches} "
                f"eps {progress.eps:.4g} loss {progress.loss:.4f} | epoch ETA "
                f"{_duration(epoch_eta)}, run ETA {_duration(total_left)}")
        if self.tty:
            width = 20
            filled = int(width * done / progress.batches)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\x1b[K")
            if done == progress.batches:
                self.stream.write("\n")
            self.stream.flush()
        elif done == progress.batches or done % max(progress.batches // 10, 1) == 0:
            self.stream.write(text + "\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: not a device; use cpu, cuda, cuda:N or auto"
                          ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                          "device(s)")
    return device


def _distributed(device: torch.device) -> Distributed:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank=dist.get_rank(), world=dist.get_world_size())


def _shared_run_dir(path: Path | None, distributed: Distributed) -> Path | None:
    """The main process's run directory in every process (``None``: it could not make one)."""
    if distributed.world == 1:
        return path
    import torch.distributed as dist

    box: list[str | None] = [str(path) if path is not None else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0]) if box[0] is not None else None


def _load(args: argparse.Namespace, parser: argparse.ArgumentParser
          ) -> tuple[TrainConfig, Path | None]:
    if args.resume is not None:
        if args.config is not None or args.overrides:
            parser.error("--resume continues a run with its stored config: drop --config and "
                         "the overrides")
        last = args.resume / "last.pt"
        if not args.resume.is_dir():
            raise ConfigError(f"--resume {args.resume}: no such run directory")
        if not last.is_file():
            raise ConfigError(f"--resume {args.resume}: no last.pt in that directory")
        stored = load_checkpoint(last, map_location="cpu", resume=True)
        try:
            return parse_config(stored.config), last
        except ConfigError as error:
            raise ConfigError(f"{last}: its stored config is not valid: {error}") from error
    if args.config is None:
        parser.error("--config is required (or --resume RUN)")
    return load_config(args.config, args.overrides), None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tightrope-train``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    out = sys.stdout
    keep_freed_memory()
    flush_denormals()  # before any parallel operation: worker threads inherit the setting
    if not args.no_compile:
        compile_kernels()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        config, checkpoint = _load(args, parser)
        device = _device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    except (ValueError, FileNotFoundError) as error:  # ConfigError, CheckpointError, no data
        return _error(str(error))
    if str(device).startswith("cuda"):
        torch.cuda.set_device(device)  # NCCL needs each process on its own GPU
    distributed = _distributed(device)
    main_process = distributed.is_main
    run_dir: Path | None = None
    new_run = _NewRun(args.out)
    if main_process:
        if args.resume is not None:
            run_dir = args.resume
        else:
            try:
                run_dir = new_run.create(config)
            except OSError as error:
                _error(f"cannot create a run directory in {args.out}: "
                       f"{_reason(error, known=args.out)}; pass --out a writable directory")
    run_dir = _shared_run_dir(run_dir, distributed)
    if run_dir is None:
        return 2

    def message(text: str) -> None:
        if main_process:
            print(text, file=out, flush=True)

    try:
        trainer = Trainer(
            config, run_dir=run_dir, device=device, distributed=distributed,
            on_progress=ProgressPrinter(sys.stderr, quiet=args.quiet or not main_process),
            on_message=message,
            command=["tightrope-train", *(sys.argv[1:] if argv is None else argv)],
        )
        if checkpoint is not None:
            trainer.restore(checkpoint)
    except (ValueError, ImportError, OSError) as error:  # DatasetNotFoundError is an OSError
        if main_process:
            new_run.clean_up()
        return _error(_reason(error) if isinstance(error, OSError) else str(error))
    message(f"run directory: {run_dir}")
    started = time.perf_counter()
    try:
        result = trainer.fit()
        wall = time.perf_counter() - started
        if main_process:
            best = result.best
            message(f"trained {config.epochs} epochs in {_duration(wall)} ({wall:.1f} s); "
                    f"kept epoch {result.best_epoch} (model selection: "
                    f"{result.selection.value}) on validation: clean "
                    f"{best.get('clean_accuracy', float('nan')):.4f}, PGD "
                    f"{best.get('pgd_accuracy', float('nan')):.4f}, verified "
                    f"{best.get('verified_accuracy', float('nan')):.4f}")
        if not args.no_test:
            _test(trainer, run_dir, message, main_process)
    except NonFiniteLossError as error:
        print(f"tightrope-train: stopped: {error}", file=sys.stderr)
        return 3
    except (DatasetNotFoundError, CheckpointError) as error:
        return _error(str(error))
    except OSError as error:
        if not main_process:
            return 2
        for stray in run_dir.glob("*.tmp"):  # the writers remove their own; this is a backstop
            stray.unlink(missing_ok=True)
        if new_run.clean_up():
            return _error(f"{_reason(error)}; nothing was kept (the new run directory is "
                          "removed): free disk space or pass --out a writable directory, then "
                          "run again")
        return _error(f"{_reason(error)}; {run_dir / 'last.pt'} keeps the last saved state: "
                      f"free disk space or fix the permissions, then continue with "
                      f"`tightrope-train --resume {run_dir}`")
    if main_process:
        message(f"run directory: {run_dir}")
        message(f"look at it with: tensorboard --logdir {run_dir / 'tensorboard'}")
    if distributed.world > 1:
        import torch.distributed as dist

        # The trainer (model, loaders, logs) is released before the group goes, not during
        # interpreter shutdown: left alive, a finished CPU run under torchrun aborted at exit
        # in about a third of the runs ("terminate called without an active exception").
        del trainer
        gc.collect()
        dist.destroy_process_group()
    return 0


def _error(text: str) -> int:
    print(f"tightrope-train: error: {text}", file=sys.stderr)
    return 2


def _reason(error: OSError, known: Path | None = None) -> str:
    """An OSError in one line, its path named once (not at all when it is ``known``)."""
    text = error.strerror or str(error)
    name = str(error.filename)
    if error.filename is not None and name != str(known) and name not in text:
        text = f"{error.filename}: {text}"
    return text


class _NewRun:
    """The run directory this invocation creates, so that a failure before its first
    checkpoint leaves nothing half-made: the directory goes again, and ``--out`` too when this
    run made it and it is empty."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.out_existed = out.exists()
        self.path: Path | None = None

    def create(self, config: TrainConfig) -> Path:
        try:
            self.path = create_run_dir(self.out, config)
        except OSError:
            self._remove_out()
            raise
        return self.path

    def clean_up(self) -> bool:
        """Remove the new run directory unless it holds a checkpoint; returns whether it was
        removed."""
        if self.path is None or (self.path / "last.pt").exists():
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        self._remove_out()
        return True

    def _remove_out(self) -> None:
        if not self.out_existed:
            with contextlib.suppress(OSError):  # not empty, or never made
                self.out.rmdir()


def _test(trainer: Trainer, run_dir: Path, message: Callable[[str], None],
          main_process: bool) -> None:
    """Evaluate ``best.pt`` on the test split (a report; selection used validation only)."""
    best = load_checkpoint(run_dir / "best.pt", map_location=trainer.device)
    trainer.model.load_state_dict(best.model.state_dict())
    started = time.perf_counter()
    metrics = trainer.evaluate(trainer.test_loader(), whole=True)
    seconds = time.perf_counter() - started
    if not main_process:
        return
    report: dict[str, float | str] = {
        k: v for k, v in metrics.items() if not k.endswith("_count")}
    report["eps"] = trainer.config.eps.test_eps
    report["epoch"] = best.epoch
    report["selection"] = trainer.selection.value
    report["seconds"] = seconds
    write_text_atomic(run_dir / "test_metrics.json", json.dumps(report, indent=2) + "\n")
    parts = [f"{name} {report[name]:.4f}" for name in (
        "clean_accuracy", "pgd_accuracy", "ibp_verified_accuracy", "crown_ibp_verified_accuracy",
        "verified_accuracy", "taps_accuracy") if name in report]
    message(f"test split ({int(metrics['samples'])} samples, eps {report['eps']:.4g}, "
            f"best.pt from epoch {best.epoch}): " + ", ".join(parts))


if __name__ == "__main__":
    raise SystemExit(main())
