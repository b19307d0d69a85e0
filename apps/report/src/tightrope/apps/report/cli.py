"""``tightrope-report``: markdown tables and PNG figures from run directories and certification
results.

    tightrope-report 'runs/*' --out results
    tightrope-report runs/cc_ibp-* runs/ibp-* --label loss.options.alpha --out results/alpha
    tightrope-report --histogram results/gap.npz --out results/gap

Exit status: 0 done; 2 bad input (a missing directory, a run directory without metrics.csv,
unreadable JSON/YAML/CSV, a results file that tightrope-report did not write), with one line
on stderr naming the file and what to do; 1 an internal error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tightrope.apps.report.__about__ import __version__
from tightrope.apps.report.arrays import load_arrays
from tightrope.apps.report.inputs import ReportError, collect, read_published, read_text
from tightrope.apps.report.rows import Row, Setting, group_rows

__all__ = ["build_parser", "main"]

DEFAULT_REFERENCES = ("ibp", "pgd")

EPILOG = """\
inputs:
  RUN_OR_GLOB is a run directory of tightrope-train (config.yaml, meta.json, metrics.csv,
  test_metrics.json) or a glob pattern ('runs/*'; quote it to let tightrope-report expand
  it, sorted). The results of tightrope-certify --checkpoint RUN/best.pt --out DIR (run.json,
  summary.json, samples.*) are found in any subdirectory of the run, or can be given as
  arguments of their own: they are matched to their run by the checkpoint in run.json (that
  run must be given too). A run certified several times gets one row per certification.

outputs (in --out, created if needed):
  README.md (--markdown)  per setting (data set, eps): the methods table (method, model,
                          --label value, run, clean / PGD / certified / not falsified /
                          training-time verified accuracy, samples, training and
                          certification time, timeout per sample, counts of the deciding
                          stages), the figures, notes, and per run the tightrope-train and
                          tightrope-certify commands; then the histograms.

commands:
  A command recorded in meta.json ("command" or "argv") is shown as it is. Otherwise the
  tightrope-train command is rebuilt and marked so: the file under --configs that, with
  key=value overrides, resolves to exactly the run's config.yaml, plus --out, --device and
  torchrun from meta.json (--threads is not recorded anywhere); the tightrope-certify command
  is rebuilt from its run.json.
  curves-SETTING.png      validation clean / PGD / verified accuracy and training loss per
                          epoch, one line per run (SETTING: DATASET-epsEPS, e.g.
                          fashion_mnist-eps0.1, cifar10-eps2_255).
  tradeoff-SETTING.png    clean vs certified accuracy, one point per row, labelled by the
                          --label value; --reference methods drawn as black squares; a hollow
                          point has no tightrope-certify result (training-time verified).
  hist-NAME.png           for each --histogram file: one histogram per array, shared bins.
  Rows are sorted (method, model, label, run) and numbers have fixed formats: the same inputs
  regenerate the same markdown. A markdown file that tightrope-report did not write is not
  overwritten without --force.

exit status: 0 done; 2 bad input (missing directory, a run directory without metrics.csv,
unreadable JSON/YAML/CSV or arrays, a markdown file not written by tightrope-report), one line
on stderr naming the file; 1 internal error.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tightrope-report",
        description="Turn tightrope-train run directories and tightrope-certify results into "
        "markdown tables and PNG figures.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="*", metavar="RUN_OR_GLOB",
                        help="run directories, certification directories or glob patterns")
    parser.add_argument("--out", type=Path, default=Path("results"), metavar="DIR",
                        help="where the markdown and figures go (default: results)")
    parser.add_argument("--markdown", default="README.md", metavar="NAME",
                        help="file name of the markdown report in --out (default: README.md)")
    parser.add_argument("--title", default="Results", help="the report's heading "
                        "(default: Results)")
    parser.add_argument("--label", default="loss.options.alpha", metavar="KEY",
                        help="config key whose value labels the rows and the trade-off points, "
                        "e.g. loss.options.alpha (the default; a loss option left at its "
                        "default is read from loss.resolved) or optim.lr; runs without it "
                        "are labelled by method")
    parser.add_argument("--reference", action="append", metavar="METHOD",
                        help="method drawn as a reference point in the trade-off figure "
                        "(repeatable; default: ibp and pgd)")
    parser.add_argument("--configs", type=Path, default=Path("configs"), metavar="DIR",
                        help="config files to match runs against when rebuilding their "
                        "tightrope-train command (default: configs; skipped when missing)")
    parser.add_argument("--histogram", action="append", type=Path, default=[], metavar="FILE",
                        help="a .npz file or a .json object of named number arrays (e.g. "
                        "estimate minus exact per method): one histogram per array on shared "
                        "axes (repeatable)")
    parser.add_argument("--bins", type=int, default=50, metavar="N",
                        help="histogram bins (default: 50)")
    parser.add_argument("--notes", type=Path, metavar="FILE",
                        help="a markdown file inserted after the legend (the analysis of the "
                        "results, kept beside them so that regenerating keeps it)")
    parser.add_argument("--published", type=Path, metavar="FILE",
                        help="a CSV file of published results (columns dataset, eps, method, "
                        "model, clean, certified, source; accuracies in %%), listed for "
                        "context under the table of their setting")
    parser.add_argument("--force", action="store_true",
                        help="overwrite a markdown file that tightrope-report did not write")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _error(text: str) -> int:
    print(f"tightrope-report: error: {text}", file=sys.stderr)
    return 2


def _check_markdown(path: Path, force: bool) -> None:
    from tightrope.apps.report.markdown import MARKER

    if force or not path.exists():
        return
    if not path.is_file():
        raise ReportError(f"{path}: not a file; pass another --markdown name")
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            first = handle.readline().rstrip("\n")
    except OSError as error:
        raise ReportError(f"{path}: cannot read it ({error.strerror or error})") from error
    if first != MARKER:
        raise ReportError(f"{path} was not written by tightrope-report; pass --force to "
                          "overwrite it, or another --out or --markdown")


def _figure_name(stem: str, taken: set[str]) -> str:
    name, number = f"{stem}.png", 1
    while name in taken:
        number += 1
        name = f"{stem}-{number}.png"
    taken.add(name)
    return name


def _has_point(rows: Sequence[Row]) -> bool:
    return any(r.clean is not None and (r.certified is not None or r.train_verified is not None)
               for r in rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tightrope-report``; returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(arguments)
    if not args.inputs and not args.histogram:
        parser.error("give at least one run directory (or glob), or --histogram FILE")
    if args.bins < 1:
        parser.error(f"--bins must be at least 1, got {args.bins}")
    if Path(args.markdown).name != args.markdown or not args.markdown:
        parser.error(f"--markdown takes a file name, got {args.markdown!r}")
    references = tuple(args.reference) if args.reference else DEFAULT_REFERENCES
    out: Path = args.out
    try:
        runs = collect(args.inputs)
        arrays = [(path, load_arrays(path)) for path in args.histogram]
        notes = read_text(args.notes) if args.notes is not None else ""
        published = read_published(args.published) if args.published is not None else []
        if out.exists() and not out.is_dir():
            raise ReportError(f"--out {out}: not a directory")
        markdown_path = out / args.markdown
        _check_markdown(markdown_path, args.force)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ReportError(f"--out {out}: cannot create it ({error.strerror or error})"
                              ) from error
    except ReportError as error:
        return _error(str(error))

    from tightrope.apps.report.figures import draw_curves, draw_histogram, draw_tradeoff
    from tightrope.apps.report.markdown import Histogram, render

    groups = group_rows(runs, args.label)
    taken: set[str] = set()
    figures: dict[Setting, list[tuple[str, str]]] = {}
    try:
        for setting, rows in groups.items():
            names = figures.setdefault(setting, [])
            curves = _figure_name(f"curves-{setting.slug}", taken)
            draw_curves(rows, setting.title, out / curves)
            names.append((f"training curves, {setting.title}", curves))
            if _has_point(rows):
                tradeoff = _figure_name(f"tradeoff-{setting.slug}", taken)
                draw_tradeoff(rows, setting.title, out / tradeoff, references=references,
                              label_key=args.label)
                names.append((f"clean vs certified, {setting.title}", tradeoff))
        histograms = []
        for path, named in arrays:
            image = _figure_name(f"hist-{path.stem}", taken)
            draw_histogram(named, path.name, out / image, bins=args.bins)
            histograms.append(Histogram(path, named, image))
        text = render(groups, title=args.title, arguments=arguments, figures=figures,
                      histograms=histograms, label_key=args.label, configs=args.configs,
                      notes=notes, published=published)
        temporary = markdown_path.with_name(markdown_path.name + ".tmp")
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(markdown_path)
    except OSError as error:
        return _error(f"cannot write to {out}: {error.strerror or error}")
    count = len(taken)
    print(f"wrote {markdown_path} ({sum(len(r) for r in groups.values())} rows in "
          f"{len(groups)} settings) and {count} figure{'s' if count != 1 else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
